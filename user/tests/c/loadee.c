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

/*
 * A function gcc inlines into its caller at -O2 (tests/loader.rs: the loader warns
 * that the caller keeps the old code; klp-convert --patch-callers replaces the caller
 * too). The pointer keeps an out-of-line copy, which is what a patch replaces.
 */
static int klp_loadee_inl(int x)
{
	return x * 3;
}

int klp_loadee_inl_caller(int x)
{
	return klp_loadee_inl(x) + 1;
}

int (*volatile klp_loadee_inl_ptr)(int) = klp_loadee_inl;

#include "mcount_ppc64le.h"
