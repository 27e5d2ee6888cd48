/* LTO (tests/compiled.rs): helper is defined here and inlined into user of lto_b.c. */
int helper(int x)
{
	int s = 0;

	for (int i = 0; i < x; i++)
		s += i ^ x;
	return s;
}
