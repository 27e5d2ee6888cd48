/*
 * patch.c: the template of every soak patch, built with -DV=n: replacements of both
 * functions of each pair of soak.c and of libsoak.c, returning version n (see soak.c).
 * The program's functions are reached through .klp.sym.vmlinux.* symbols, the
 * library's through .klp.sym.libsoak.* (klp-convert; ci/soak writes the manifests,
 * some with "replace": true).
 *
 * -DSOAK_INJECT (ci/soak's SOAK_INJECT=1, never by default) breaks one replacement
 * on purpose: soak_b1's returns V + 1, so every call of soak_a1 while a patch is in
 * effect is a violation, which the soak must report and fail on.
 */
#include "soak.h"

#ifndef V
#error "build with -DV=<version>"
#endif

#define PAIR_FN __attribute__((noipa, noinline))

long soak_enter(void);
void soak_check(int pair, long v, long w, long t);
void soak_nap(long us);

#define PAIR(k, bad)                                     \
	long soak_b##k(void);                            \
	long soak_b##k##_new(void);                      \
	long soak_a##k##_new(long nap);                  \
	PAIR_FN long soak_b##k##_new(void)               \
	{                                                \
		return V + (bad);                        \
	}                                                \
	PAIR_FN long soak_a##k##_new(long nap)           \
	{                                                \
		long t = soak_enter(), w;                \
                                                         \
		if (nap)                                 \
			soak_nap(nap);                   \
		w = soak_b##k();                         \
		soak_check(k, V, w, t);                  \
		return V;                                \
	}

#ifdef SOAK_INJECT
#define BAD 1
#else
#define BAD 0
#endif

PAIR(0, 0)
PAIR(1, BAD)
PAIR(2, 0)

/* The library's pair. */
extern const struct soak_hooks *lib_hooks;
long soak_lb(void);
long soak_lb_new(void);
long soak_la_new(long nap);

PAIR_FN long soak_lb_new(void)
{
	return V;
}

PAIR_FN long soak_la_new(long nap)
{
	long t = lib_hooks->enter(), w;

	if (nap)
		lib_hooks->nap(nap);
	w = soak_lb();
	lib_hooks->check(PAIRS, V, w, t);
	return V;
}
