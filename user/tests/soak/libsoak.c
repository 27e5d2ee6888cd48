/*
 * libsoak.c: the late library of the soak. soak.c dlopens and dlcloses it whenever
 * ci/soak says so, and its workers call soak_la() while it is loaded; soak_la() calls
 * soak_lb() and checks that both have the same version, as the program's pairs do
 * (see soak.c, and there why the pair is noipa). The patches replace both, whether
 * the library is loaded when they are (its relocations and sites are then written
 * when it arrives) or not.
 *
 * soak_lb and lib_hooks are static: the patches reach them only through .klp.sym.libsoak.*
 * symbols, resolved when the library is there.
 */
#include "soak.h"

#define PAIR_FN __attribute__((noipa, noinline))

static const struct soak_hooks *lib_hooks;

void soak_lib_init(const struct soak_hooks *h);
long soak_la(long nap);

void soak_lib_init(const struct soak_hooks *h)
{
	lib_hooks = h;
}

PAIR_FN static long soak_lb(void)
{
	return 0;
}

PAIR_FN long soak_la(long nap)
{
	long t = lib_hooks->enter(), w;

	if (nap)
		lib_hooks->nap(nap);
	w = soak_lb();
	lib_hooks->check(PAIRS, 0, w, t);
	return 0;
}
