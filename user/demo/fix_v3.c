/*
 * fix_v3.c: the second fix of klp-demo's request handler, a cumulative patch: its
 * manifest (fix_v3.json) asks for atomic replace, so enabling it replaces fix_v2 as
 * a whole (as the kernel's "replace": true patches do) and disabling it goes back to
 * the program's own handler.
 *
 * Built and converted like fix_v2.c.
 */
#include <stdint.h>

uint64_t klp_demo_handle_v3(uint64_t req);

uint64_t klp_demo_handle_v3(uint64_t req)
{
	(void)req;
	return 3;
}
