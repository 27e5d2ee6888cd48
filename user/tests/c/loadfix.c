/*
 * The replacement of klp_loadee_compute (tests/c/loadee.c), built as an ordinary
 * object and turned into a patch file by klp-convert in tests/loader.rs. It calls the
 * target's static helper and updates its static counter, and calls into the C library
 * (resolved by the loader in the dynamic linker's order).
 */

#include <stdlib.h>

extern int klp_loadee_count;
extern int klp_loadee_helper(int x);

int klp_loadfix_seen;

int klp_loadee_compute_fixed(int x)
{
	klp_loadee_count += 100;
	klp_loadfix_seen++;
	return klp_loadee_helper(x) + abs(-2);
}

int klp_loadfix_pre_patch(void *obj)
{
	(void)obj;
	klp_loadfix_seen = 1000;
	return 0;
}

/* The replacement of klp_loadlib_value (tests/c/loadlib.c), for a library loaded later. */
extern int klp_loadlib_helper(int x);
extern int klp_loadlib_calls;

int klp_loadlib_value_fixed(int x)
{
	klp_loadlib_calls += 10;
	return klp_loadlib_helper(x);
}

/* The replacement of the inlined klp_loadee_inl, and a fixed copy of its caller. */
int klp_loadee_inl_fixed(int x)
{
	return x * 4;
}

int klp_loadee_inl_caller(int x)
{
	return klp_loadee_inl_fixed(x) + 1;
}
