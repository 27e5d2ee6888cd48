/*
 * Patch targets written in C for tests/c_functions.rs. build.rs compiles this file
 * twice with the architecture's patchable-entry flags: into the test executable
 * (names prefixed klp_cexe_) and into the shared object libklpcfun.so (klp_cso_).
 * KLP_CPFX is the prefix.
 *
 * noipa keeps every function a real call with its own entry site: no inlining, no
 * cloning, no interprocedural shortcuts between a caller and its callee.
 */

#ifndef KLP_CPFX
#error "KLP_CPFX (the name prefix) is not defined"
#endif

#define KLP_CAT2(a, b) a##b
#define KLP_CAT(a, b) KLP_CAT2(a, b)
#define F(name) KLP_CAT(KLP_CPFX, name)

#define KLP_NOIPA __attribute__((noipa))

/* The simplest target. */
KLP_NOIPA int F(add)(int a, int b)
{
	return a + b;
}

/*
 * Every integer and eight floating-point argument registers on every architecture,
 * and stack arguments on x86_64 and s390x. Each argument has its own weight, so a
 * swapped or clobbered one shows; the values the test passes keep the arithmetic
 * exact.
 */
KLP_NOIPA double F(many)(int a, int b, int c, int d, int e, int f, int g, int h,
			 double x0, double x1, double x2, double x3, double x4,
			 double x5, double x6, double x7)
{
	long ints = a * 1L + b * 2L + c * 3L + d * 4L + e * 5L + f * 6L + g * 7L + h * 8L;

	return (double)ints + x0 * 10 + x1 * 11 + x2 * 12 + x3 * 13 + x4 * 14 + x5 * 15 +
	       x6 * 16 + x7 * 17;
}

/* B of the pair: patched while A keeps calling it from C. */
KLP_NOIPA int F(inner)(int x)
{
	return x * 3;
}

/* A of the pair. */
KLP_NOIPA int F(outer)(int x)
{
	return F(inner)(x) + 1000;
}

/* Calls back: lets a test hold a thread inside a C function. */
KLP_NOIPA int F(call)(int (*cb)(int), int x)
{
	return cb(x) + 1;
}

#if defined(__powerpc64__) && defined(_CALL_ELF) && _CALL_ELF == 2
/*
 * -pg -mprofile-kernel puts `mflr r0; bl _mcount` at each local entry, with the
 * kernel's convention: r0 = the caller's return address, and _mcount returns to the
 * function with LR = r0. glibc's _mcount follows another convention, so this object
 * brings the kernel's no-op; hidden, so that the `bl` binds here without a PLT stub
 * (which this call site, having no TOC-restore slot, could not use).
 */
__asm__(".pushsection .text\n"
	".globl _mcount\n"
	".hidden _mcount\n"
	".type _mcount, @function\n"
	".p2align 2\n"
	"_mcount:\n"
	"\tmflr 12\n"
	"\tmtctr 12\n"
	"\tmtlr 0\n"
	"\tbctr\n"
	".size _mcount, . - _mcount\n"
	".popsection\n");
#endif
