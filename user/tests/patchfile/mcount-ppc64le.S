/*
 * ppc64le only: gcc's -pg -mprofile-kernel puts "mflr r0; bl _mcount" at each
 * function's local entry, with the kernel's convention (r0 = the caller's return
 * address; _mcount returns to the function with LR = r0). glibc's _mcount follows
 * another convention, so each object built with the patch sites links this no-op, as
 * the kernel links its own. Hidden, so that the "bl" binds within the object without a
 * PLT stub (which a call site without a TOC-restore slot could not use). Not part of
 * the program's logic: it is the build's, like the flags.
 */
	.abiversion 2
	.section .text
	.globl _mcount
	.hidden _mcount
	.type _mcount, @function
	.p2align 2
_mcount:
	mflr 12
	mtctr 12
	mtlr 0
	bctr
	.size _mcount, . - _mcount
	.section .note.GNU-stack, "", @progbits
