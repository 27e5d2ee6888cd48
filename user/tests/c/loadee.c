/*
 * A patch target for tests/loader.rs, linked into the test executable with the
 * architecture's patchable-entry flags: a function with a bug, a static helper and a
 * static counter that a patch file's replacement uses through klp-convert's
 * livepatch symbols (they are not exported: ordinary linking cannot reach them).
 */

static int klp_loadee_count;

static __attribute__((noipa)) int klp_loadee_helper(int x)
{
	return x * 10;
}

__attribute__((noipa)) int klp_loadee_compute(int x)
{
	klp_loadee_count++;
	return x + 1;
}

int klp_loadee_counter(void)
{
	return klp_loadee_count;
}

int klp_loadee_helper_ref(int x)
{
	return klp_loadee_helper(x);
}

#if defined(__powerpc64__) && defined(_CALL_ELF) && _CALL_ELF == 2
/*
 * ppc64le: the `_mcount` of gcc's -mprofile-kernel convention (entered with LR = the
 * site + 8 and r0 = the function's own return address; returns to the site with LR
 * put back), as the kernel defines its own. glibc's `_mcount` is reached through a
 * PLT stub that needs a TOC-restore slot after the `bl`, which -mprofile-kernel does
 * not leave, so a function that uses its TOC cannot be linked against it.
 */
__asm__(".globl _mcount\n"
	".type _mcount,@function\n"
	"_mcount:\n"
	"	mflr 12\n"
	"	mtctr 12\n"
	"	mtlr 0\n"
	"	bctr\n"
	".size _mcount,.-_mcount\n");
#endif
