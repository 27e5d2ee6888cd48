/*
 * soak.h: what soak.c, libsoak.c and the patch template share.
 */
#ifndef SOAK_H
#define SOAK_H

/* The program's pairs soak_aK/soak_bK, K in 0..PAIRS-1; the library's pair is
 * reported as pair PAIRS. */
#define PAIRS 3

/* The program's checks, handed to the library when it is loaded (the library does
 * not link against the program). See soak.c. */
struct soak_hooks {
	long (*enter)(void);
	void (*check)(int pair, long v, long w, long t);
	void (*nap)(long us);
};

#endif
