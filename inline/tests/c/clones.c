/*
 * Clones (tests/compiled.rs, built with -O3): compute is specialised for k == 7 as
 * compute.constprop.0, which a and b call; c and d call compute itself. part is
 * partially inlined: its test is inlined into p1 and p2, which call the rest,
 * part.part.0.
 */

static __attribute__((noinline)) int compute(int x, int k)
{
	int s = 0;

	for (int i = 0; i < x; i++) {
		switch ((s ^ i) & 7) {
		case 0: s += i * k; break;
		case 1: s ^= k << 3; break;
		case 2: s -= i / (k | 1); break;
		case 3: s *= 3; break;
		default: s += 5;
		}
	}
	return s;
}

int a(int x) { return compute(x, 7) + 1; }
int b(int x) { return compute(x, 7) * 2; }
int c(int x, int k) { return compute(x, k) * 2; }
int d(int x, int k) { return compute(x + 1, k) * 2; }

int table[256];

static int part(int x)
{
	if (x < 16)
		return x;
	int s = 0;
	for (int i = 0; i < x; i++) {
		switch ((s ^ i) & 7) {
		case 0: s += table[i & 255] * x; break;
		case 1: s ^= x << 3; break;
		case 2: s -= i / (x | 1); break;
		case 3: s *= 3; break;
		case 4: s += 17 * i; break;
		case 5: s = (s >> 2) + table[s & 255]; break;
		case 6: s ^= i * 31; break;
		default: s += 5;
		}
	}
	return s;
}

__attribute__((noinline)) int p1(int x) { return part(x) + 1; }
__attribute__((noinline)) int p2(int x) { return part(x + 2) * 3; }
