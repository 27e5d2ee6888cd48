/*
 * prog.c: an ordinary multi-threaded C program, written as if klp did not exist.
 * ci/patchfile runs it under LD_PRELOAD=libklp.so and live-patches it.
 *
 * Four worker threads keep calling compute(); a reporter thread prints one line every
 * 200 ms with each worker's last result; the main thread waits for them all in
 * pthread_join. When the file named by the first argument appears, the reporter
 * loads the plug-in named by the second argument (dlopen) and reports its
 * plug_value() from then on.
 *
 *   usage: prog [TRIGGER PLUGIN [SECONDS]]     (stops by itself after SECONDS, 600)
 *
 * Output, one line per report:
 *   tick 12: compute 1 4 9 16; computed 80; plug -; bias 100
 *
 * The bug: compute() leaves out the bias (the results should be 101 104 109 116;
 * PROG_BIAS sets another bias).
 *
 * Built with -O2, frame pointers and the architecture's patchable function entries;
 * nothing else is special. Two functions are marked noinline, because gcc -O2 would
 * otherwise inline these small static functions into their only callers and drop
 * them: there would be no compute() to replace and no square() for the fix to call.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 4

static long bias = 100;		 /* what every result must include */
static unsigned long computed;	 /* computations since the last report */
static volatile long results[WORKERS];
static volatile int stop;

static const char *trigger, *plugin;
static int seconds = 600;

static void nap(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* noinline: see the top of the file. */
static __attribute__((noinline)) long square(long x)
{
	return x * x;
}

/* The bug: the bias is left out. noinline: see the top of the file. */
static __attribute__((noinline)) long compute(long x)
{
	__atomic_fetch_add(&computed, 1, __ATOMIC_RELAXED);
	return square(x);
}

static void *worker(void *arg)
{
	long i = (long)(intptr_t)arg;

	while (!stop) {
		results[i] = compute(i + 1);
		nap(10);
	}
	return NULL;
}

static void *reporter(void *arg)
{
	int (*plug_value)(void) = NULL;
	int tried = 0, tick;
	char plug[32];

	(void)arg;
	for (tick = 0; tick < seconds * 5; tick++) {
		nap(200);
		if (!tried && trigger && access(trigger, F_OK) == 0) {
			void *h = dlopen(plugin, RTLD_NOW);

			tried = 1;
			if (!h)
				printf("dlopen: %s\n", dlerror());
			else
				plug_value = (int (*)(void))dlsym(h, "plug_value");
		}
		if (plug_value)
			snprintf(plug, sizeof(plug), "%d", plug_value());
		else
			snprintf(plug, sizeof(plug), "-");
		printf("tick %d: compute %ld %ld %ld %ld; computed %lu; plug %s; bias %ld\n",
		       tick, results[0], results[1], results[2], results[3],
		       __atomic_exchange_n(&computed, 0, __ATOMIC_RELAXED), plug, bias);
		fflush(stdout);
	}
	stop = 1;
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t[WORKERS + 1];
	const char *b = getenv("PROG_BIAS");
	long i;

	if (argc > 2) {
		trigger = argv[1];
		plugin = argv[2];
	}
	if (argc > 3)
		seconds = atoi(argv[3]);
	if (b)
		bias = atol(b);
	for (i = 0; i < WORKERS; i++)
		if (pthread_create(&t[i], NULL, worker, (void *)(intptr_t)i) != 0)
			return 1;
	if (pthread_create(&t[WORKERS], NULL, reporter, NULL) != 0)
		return 1;
	printf("prog %d: %d workers\n", (int)getpid(), WORKERS);
	fflush(stdout);
	for (i = 0; i <= WORKERS; i++)
		pthread_join(t[i], NULL);
	return 0;
}
