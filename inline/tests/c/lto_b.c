/* LTO (tests/compiled.rs): user inlines helper of lto_a.c. */
int helper(int x);

__attribute__((noinline)) int user(int x)
{
	return helper(x) + 1;
}

int main(int argc, char **argv)
{
	(void)argv;
	return user(argc);
}
