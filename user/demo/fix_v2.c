/*
 * fix_v2.c: the first fix of klp-demo's request handler (user/src/bin/klp-demo.rs),
 * as a livepatch: klp_demo_handle() is replaced by klp_demo_handle_v2(), which
 * answers 2.
 *
 * Like the handler it replaces, it calls the program's klp_demo_wait_point(), where a
 * request waits when the program is asked to hold one (SIGUSR1): ci/demo holds a
 * request inside this function while it loads fix_v3. The program does not export
 * that function (a Rust executable exports nothing), so klp-convert turns the
 * reference into .klp.sym.vmlinux.klp_demo_wait_point,0 (vmlinux: the program
 * itself), which klp resolves in the running process.
 *
 * Built with -O2 -fno-omit-frame-pointer and the architecture's patch flags (-fPIC;
 * s390x also -mbackchain; ppc64le the default); converted with
 *   klp-convert -t vmlinux=klp-demo -m fix_v2.json fix_v2.o -o fix_v2.klp.o
 * The patch takes its name from the file: fix_v2.
 */
#include <stdint.h>

void klp_demo_wait_point(uint64_t req);

uint64_t klp_demo_handle_v2(uint64_t req);

uint64_t klp_demo_handle_v2(uint64_t req)
{
	klp_demo_wait_point(req);
	return 2;
}
