/*
 * klp-inline's test program (tests/compiled.rs builds it with each compiler).
 *
 * compute is inlined into worker (flatten inlines every call of its body) and called
 * out of line by other (its address is taken, so its copy stays, and a function
 * that large is not inlined where nothing forces it).
 */

static int compute(int x)
{
	int s = 0;

	for (int i = 0; i < x; i++) {
		switch ((s ^ i) & 7) {
		case 0: s += i * x; break;
		case 1: s ^= x << 3; break;
		case 2: s -= i / (x | 1); break;
		case 3: s *= 3; break;
		case 4: s += 17 * i; break;
		case 5: s = (s >> 2) + x; break;
		case 6: s ^= i * 31; break;
		default: s += 5;
		}
	}
	return s;
}

__attribute__((flatten, noinline)) int worker(int x)
{
	return compute(x) + 1;
}

__attribute__((noinline)) int other(int x)
{
	return compute(x * 3) * 2;
}

int (*volatile klp_fp)(int) = compute;

/* Nested inlining: leaf into mid, mid into top. Both copies are in top's code. */
static inline __attribute__((always_inline)) int leaf(int x)
{
	return x * x + 7;
}

static inline __attribute__((always_inline)) int mid(int x)
{
	return leaf(x + 1) * 2;
}

__attribute__((noinline)) int top(int x)
{
	return mid(x) - 1;
}

/*
 * Global functions: gsmall is inlined into its only caller in an executable (its
 * out-of-line copy stays, and no direct call reaches it; in a shared object it may be
 * interposed, so it is called through the PLT); gcalled is called once.
 */
int gsmall(int x)
{
	return x * 7 + 3;
}

__attribute__((noinline)) int guser(int x)
{
	return gsmall(x) + 1;
}

__attribute__((noinline)) int gcalled(int x)
{
	return x * 11 + 5;
}

__attribute__((noinline)) int gcaller(int x)
{
	return gcalled(x) + 2;
}

#ifdef WITH_MAIN
int main(int argc, char **argv)
{
	(void)argv;
	return worker(argc) + other(argc) + top(argc) + guser(argc) + gcaller(argc) +
	       klp_fp(argc);
}
#endif
