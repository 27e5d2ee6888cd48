// A C++ method (tests/compiled.rs): its DWARF definition names it through
// DW_AT_specification; callers are found by its linkage name _ZN1S1fEi.
struct S {
	int k;
	int f(int x);
};

inline int S::f(int x)
{
	return x * k + 3;
}

__attribute__((noinline)) int use(S *s, int x)
{
	return s->f(x) + 1;
}

int (S::*keep)(int) = &S::f;
