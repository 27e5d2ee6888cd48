/*
 * fix_rs.c: the replacement of rsprog_compute() in rsprog (user/examples/rsprog.rs),
 * a Rust program, as a livepatch written in C.
 *
 * It calls the program's square() and uses its statics BIAS and COMPUTED: ordinary
 * Rust items, which the program does not export and which have mangled names
 * (_ZN6rsprog6square17h<hash>E: the hash changes with the build). ci/patchfile finds
 * them as a user would, with nm on the built program, and passes them to the compiler:
 *
 *   gcc -DSQUARE=_ZN6rsprog6square17h…E -DBIAS=_ZN6rsprog4BIAS17h…E \
 *       -DCOMPUTED=_ZN6rsprog8COMPUTED17h…E -c fix_rs.c
 *
 * (a mangled Rust name is a valid C identifier). klp-convert then turns the three
 * references into .klp.sym.vmlinux.<mangled name>,0 symbols, which the loader resolves
 * in the running program. square() is extern "C" in the program, so C may call it;
 * BIAS is an AtomicI64 and COMPUTED an AtomicU64, laid out as a 64-bit integer.
 */
#if !defined(SQUARE) || !defined(BIAS) || !defined(COMPUTED)
#error "give the mangled names: -DSQUARE=... -DBIAS=... -DCOMPUTED=... (nm rsprog)"
#endif

#include <stdint.h>

int64_t SQUARE(int64_t x);
extern int64_t BIAS;
extern uint64_t COMPUTED;

int64_t rsprog_compute_fixed(int64_t x);

int64_t rsprog_compute_fixed(int64_t x)
{
	__atomic_fetch_add(&COMPUTED, 1, __ATOMIC_RELAXED);
	return SQUARE(x) + __atomic_load_n(&BIAS, __ATOMIC_RELAXED);
}
