/*
 * Included by the C patch targets of the tests.
 */
#if defined(__powerpc64__) && defined(_CALL_ELF) && _CALL_ELF == 2
/*
 * ppc64le: the `_mcount` of gcc's -mprofile-kernel convention (entered with LR = the
 * site + 8 and r0 = the function's own return address; returns to the site with LR
 * put back), as the kernel defines its own. glibc's `_mcount` is reached through a
 * PLT stub that needs a TOC-restore slot after the `bl`, which -mprofile-kernel does
 * not leave, so a function that uses its TOC cannot be linked against it. Hidden, so
 * that a shared object's calls reach its own copy without a PLT stub.
 */
__asm__(".globl _mcount\n"
	".hidden _mcount\n"
	".type _mcount,@function\n"
	"_mcount:\n"
	"	mflr 12\n"
	"	mtctr 12\n"
	"	mtlr 0\n"
	"	bctr\n"
	".size _mcount,.-_mcount\n");
#endif
