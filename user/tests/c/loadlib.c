/*
 * A library that tests/loader.rs opens only after a patch file for it was loaded: the
 * patch takes effect when the library arrives. Built as libklploadlib.so with the
 * architecture's patchable-entry flags.
 */

static int klp_loadlib_calls;

static __attribute__((noipa)) int klp_loadlib_helper(int x)
{
	return x * 7;
}

__attribute__((noipa)) int klp_loadlib_value(int x)
{
	klp_loadlib_calls++;
	return x - 1;
}

int klp_loadlib_count(void)
{
	return klp_loadlib_calls;
}

int klp_loadlib_helper_ref(int x)
{
	return klp_loadlib_helper(x);
}

#include "mcount_ppc64le.h"
