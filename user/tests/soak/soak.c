/*
 * soak.c: the program ci/soak live-patches for minutes on end.
 *
 * Sixteen worker threads call chains of paired functions: soak_aK() calls soak_bK()
 * for K in 0..PAIRS-1, and libsoak.so's soak_la() calls its soak_lb() while the
 * library is loaded. Every function returns its version (0 here; patch V's
 * replacements return V), and each a checks that its b returned the version it has
 * itself (soak_check): "a of one version with b of another" is exactly what the
 * livepatch consistency model forbids, so every mismatch is a violation. Workers also
 * sleep and yield between bursts of calls, and sometimes sleep inside an a before it
 * calls its b, so transitions keep meeting threads inside patched code.
 *
 *   usage: soak CMD_FIFO LIBSOAK SEED MAX_SECONDS
 *
 * Commands, one per line on the FIFO (answered "ack WORD" on stdout once done):
 *   open | close   dlopen/dlclose the library (no worker is inside it meanwhile)
 *   force+         a forced transition may follow (see soak_enter below)
 *   force-         that forced transition is over
 *   trim           malloc_trim(0): the free memory of every malloc arena is given back,
 *                  so that ci/soak's samples of the RSS count memory in use, not the
 *                  allocator's cache (which moves by megabytes with 20 threads);
 *                  then "heap N bytes in use" (mallinfo2: every arena's allocated
 *                  bytes, the process's live heap, klp's included) and
 *                  "resident N KiB" (see resident_kib)
 *   quit           prints the "final" line and exits 0
 * Output: "soak ready ...", a "stats" line every second, "violation ..." lines (the
 * first few), "final ...". The program ends itself after MAX_SECONDS (exit status 3).
 *
 * Built with -O2, frame pointers and the architecture's patch-site flags. The pair
 * functions are noipa, not only noinline: noinline keeps each a call with its own
 * patch site, but gcc's interprocedural passes would still see through it — a b that
 * always returns 0 and has no side effect would be folded into its a's comparison
 * (the call dropped or its result assumed), a clone (.isra, .constprop) would take
 * the function's place under another name, and -fipa-ra would let a caller keep
 * values in registers the callee it compiled against happens not to touch, which a
 * replacement is free to clobber. noipa makes each call a real call of the named
 * function whose result is used at run time, as a livepatch needs. soak_enter,
 * soak_check and soak_nap are noipa too: the patches call them (by name, through
 * .klp.sym symbols), so they must stay those functions with the ordinary calling
 * convention.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "klp.h"
#include "soak.h"

/* libklp.so provides it when preloaded; the program also runs without. */
#pragma weak klp_safe_point

#define WORKERS 16
#define PAIR_FN __attribute__((noipa, noinline))

/* The force window: even outside, odd inside; bumped by "force+" and "force-". */
static long force_epoch;
static unsigned long violations, excused;
static unsigned long printed;

/* Calls per worker, published after each burst (padded: no shared cache line). */
struct slot {
	unsigned long calls, lib_calls;
	char pad[64 - 2 * sizeof(unsigned long)];
};
static struct slot slots[WORKERS];
static __thread unsigned long my_calls;

static volatile int stop;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/* The library, and the lock that keeps workers out of it while it is opened or
 * closed (writers preferred: the main thread must get in between the workers). */
static pthread_rwlock_t lib_lock;
static void *lib_handle;
static long (*lib_la)(long);
static unsigned long lib_opens, lib_closes;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&out_lock);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fflush(stdout);
	pthread_mutex_unlock(&out_lock);
}

/*
 * soak_enter, at the entry of every a: the force epoch. A forced transition switches
 * threads wherever they are, so a thread inside an old a may call a new b: the
 * consistency model does not hold across a force, by design. ci/soak brackets every
 * force with "force+" (acknowledged before it forces) and "force-" (after the force
 * and a settling pause); a mismatch of a call that overlapped that window (entered
 * inside it, or saw the epoch change) is counted as excused, not as a violation.
 */
static PAIR_FN long soak_enter(void)
{
	return __atomic_load_n(&force_epoch, __ATOMIC_SEQ_CST);
}

/* soak_check, at the end of every a: its version v, its b's w, its entry epoch t. */
static PAIR_FN void soak_check(int pair, long v, long w, long t)
{
	my_calls++;
	if (v == w)
		return;
	if ((t & 1) || __atomic_load_n(&force_epoch, __ATOMIC_SEQ_CST) != t) {
		__atomic_fetch_add(&excused, 1, __ATOMIC_RELAXED);
		return;
	}
	__atomic_fetch_add(&violations, 1, __ATOMIC_RELAXED);
	if (__atomic_fetch_add(&printed, 1, __ATOMIC_RELAXED) < 20)
		say("violation: pair %d: a of version %ld called b of version %ld\n", pair, v, w);
}

/* Sleeps the whole time, although klp's signals interrupt nanosleep. */
static PAIR_FN void soak_nap(long us)
{
	struct timespec ts = { us / 1000000, (us % 1000000) * 1000L };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* The pairs. Version 0: the program as built. */
#define PAIR(k)                                  \
	static PAIR_FN long soak_b##k(void)      \
	{                                        \
		return 0;                        \
	}                                        \
	static PAIR_FN long soak_a##k(long nap)  \
	{                                        \
		long t = soak_enter(), w;        \
                                                 \
		if (nap)                         \
			soak_nap(nap);           \
		w = soak_b##k();                 \
		soak_check(k, 0, w, t);          \
		return 0;                        \
	}
PAIR(0)
PAIR(1)
PAIR(2)

static long (*const pairs[PAIRS])(long) = { soak_a0, soak_a1, soak_a2 };

static const struct soak_hooks prog_hooks = { soak_enter, soak_check, soak_nap };

/*
 * The program's resident memory as the program itself sees it: every page of every
 * mapping of /proc/self/maps that mincore(2) reports resident. Natively this is about
 * VmRSS. Under qemu-user it is the guest's own memory: the emulator shows the guest
 * only the guest's mappings, so its own (the translated code, its per-thread heaps,
 * which grow with the code it retranslates after each site write) are left out, which
 * VmRSS, read from outside, cannot do. -1 if /proc/self/maps cannot be read.
 */
static long resident_kib(void)
{
	long page = sysconf(_SC_PAGESIZE), pages = 0;
	unsigned char *vec = NULL;
	size_t have = 0;
	char line[512];
	FILE *f = fopen("/proc/self/maps", "re");

	if (!f || page <= 0) {
		if (f)
			fclose(f);
		return -1;
	}
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;
		size_t n, i;

		if (sscanf(line, "%lx-%lx", &lo, &hi) != 2 || hi <= lo)
			continue;
		n = (hi - lo) / (unsigned long)page;
		if (n > have) {
			unsigned char *v = realloc(vec, n);

			if (!v)
				continue;
			vec = v;
			have = n;
		}
		if (mincore((void *)lo, hi - lo, vec) != 0)
			continue;
		for (i = 0; i < n; i++)
			pages += vec[i] & 1;
	}
	fclose(f);
	free(vec);
	return pages * (page / 1024);
}

/* xorshift32: each worker's own sequence, from the seed ci/soak prints. */
static unsigned next(unsigned *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 17;
	*s ^= *s << 5;
	return *s;
}

static unsigned seed;
/* SOAK_SAFE_POINTS=1: one burst in four starts with klp_safe_point() (klp.h: "at the
 * head of a worker's loop"), where the worker runs no patched function. ci/soak sets
 * it on ppc64le and s390x, whose stack scans keep meeting stale return addresses of
 * earlier calls into patched functions (no back chain through the C library): without
 * safe points transitions there wait minutes for those words to be overwritten. */
static int safe_points;

static void *worker(void *arg)
{
	long i = (long)(intptr_t)arg;
	unsigned s = (seed + (unsigned)i) * 2654435761u | 1;

	while (!stop) {
		unsigned r = next(&s);
		int n, nap_at = r % 8 == 0 ? (int)(next(&s) % 16) : -1;

		if (safe_points && klp_safe_point && (r >> 12) % 4 == 0)
			klp_safe_point();

		/* A burst of calls; in one burst of 8, one of them sleeps 0.5 to 5 ms
		 * inside its a, before it calls its b. */
		for (n = 0; n < 16; n++) {
			long nap = n == nap_at ? 500 + (long)(next(&s) % 4500) : 0;

			pairs[next(&s) % PAIRS](nap);
		}
		/* One burst in four calls the library too, if it is loaded (and the
		 * library's a sleeps inside one of those in eight). */
		if ((r >> 4) % 4 == 0 && pthread_rwlock_tryrdlock(&lib_lock) == 0) {
			if (lib_la) {
				for (n = 0; n < 8; n++)
					lib_la(n == 0 && (r >> 6) % 8 == 0 ? 500 + (long)(next(&s) % 4500) : 0);
				__atomic_fetch_add(&slots[i].lib_calls, 8, __ATOMIC_RELAXED);
			}
			pthread_rwlock_unlock(&lib_lock);
		}
		__atomic_store_n(&slots[i].calls, my_calls, __ATOMIC_RELAXED);
		/* Outside patched code: yield (one time in eight), or sleep 1 to 4 ms. */
		if ((r >> 9) % 8 == 0)
			sched_yield();
		else
			soak_nap(1000 + (long)(next(&s) % 3000));
	}
	__atomic_store_n(&slots[i].calls, my_calls, __ATOMIC_RELAXED);
	return NULL;
}

static void totals(unsigned long *calls, unsigned long *lib_calls)
{
	int i;

	*calls = *lib_calls = 0;
	for (i = 0; i < WORKERS; i++) {
		*calls += __atomic_load_n(&slots[i].calls, __ATOMIC_RELAXED);
		*lib_calls += __atomic_load_n(&slots[i].lib_calls, __ATOMIC_RELAXED);
	}
}

static void report(const char *what, long sec)
{
	unsigned long calls, lib_calls;

	totals(&calls, &lib_calls);
	say("%s %ld: calls %lu violations %lu excused %lu lib %d lib_calls %lu opens %lu closes %lu\n",
	    what, sec, calls, __atomic_load_n(&violations, __ATOMIC_RELAXED),
	    __atomic_load_n(&excused, __ATOMIC_RELAXED), lib_handle != NULL, lib_calls,
	    lib_opens, lib_closes);
}

static long max_seconds;

static void *reporter(void *arg)
{
	struct timespec at;
	long sec;

	(void)arg;
	clock_gettime(CLOCK_MONOTONIC, &at);
	for (sec = 1; !stop; sec++) {
		at.tv_sec++;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) == EINTR)
			;
		report("stats", sec);
		if (sec >= max_seconds) {
			say("soak: %ld s are up without a quit: exiting\n", sec);
			exit(3);
		}
	}
	return NULL;
}

static const char *lib_path;

static int lib_open(void)
{
	void (*init)(const struct soak_hooks *);

	if (lib_handle)
		return 0;
	pthread_rwlock_wrlock(&lib_lock);
	lib_handle = dlopen(lib_path, RTLD_NOW);
	if (!lib_handle) {
		pthread_rwlock_unlock(&lib_lock);
		say("soak: dlopen %s: %s\n", lib_path, dlerror());
		return -1;
	}
	init = (void (*)(const struct soak_hooks *))dlsym(lib_handle, "soak_lib_init");
	lib_la = (long (*)(long))dlsym(lib_handle, "soak_la");
	if (!init || !lib_la) {
		pthread_rwlock_unlock(&lib_lock);
		say("soak: dlsym: %s\n", dlerror());
		return -1;
	}
	init(&prog_hooks);
	lib_opens++;
	pthread_rwlock_unlock(&lib_lock);
	return 0;
}

static int lib_close(void)
{
	int r = 0;

	if (!lib_handle)
		return 0;
	pthread_rwlock_wrlock(&lib_lock);
	lib_la = NULL;
	if (dlclose(lib_handle) != 0) {
		say("soak: dlclose: %s\n", dlerror());
		r = -1;
	}
	lib_handle = NULL;
	lib_closes++;
	pthread_rwlock_unlock(&lib_lock);
	return r;
}

int main(int argc, char **argv)
{
	pthread_t t[WORKERS + 1];
	pthread_rwlockattr_t ra;
	char line[64];
	FILE *cmd;
	long i;
	int fd;

	if (argc != 5) {
		fprintf(stderr, "usage: soak CMD_FIFO LIBSOAK SEED MAX_SECONDS\n");
		return 2;
	}
	lib_path = argv[2];
	seed = (unsigned)strtoul(argv[3], NULL, 0) * WORKERS;
	max_seconds = atol(argv[4]);
	safe_points = getenv("SOAK_SAFE_POINTS") && strcmp(getenv("SOAK_SAFE_POINTS"), "1") == 0;
	/* O_RDWR: the FIFO never reads end-of-file between the script's writes. */
	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0 || !(cmd = fdopen(fd, "r"))) {
		fprintf(stderr, "soak: %s: %s\n", argv[1], strerror(errno));
		return 2;
	}
	pthread_rwlockattr_init(&ra);
	pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&lib_lock, &ra);
	for (i = 0; i < WORKERS; i++)
		if (pthread_create(&t[i], NULL, worker,
				   (void *)(intptr_t)i) != 0)
			return 1;
	if (pthread_create(&t[WORKERS], NULL, reporter, NULL) != 0)
		return 1;
	say("soak ready: pid %d, %d workers, %d pairs and the library's%s\n", (int)getpid(),
	    WORKERS, PAIRS, safe_points ? "; safe points in one burst of four" : "");

	while (fgets(line, sizeof(line), cmd)) {
		line[strcspn(line, "\n")] = 0;
		if (strcmp(line, "open") == 0) {
			if (lib_open() != 0)
				return 4;
		} else if (strcmp(line, "close") == 0) {
			if (lib_close() != 0)
				return 4;
		} else if (strcmp(line, "force+") == 0 || strcmp(line, "force-") == 0) {
			__atomic_fetch_add(&force_epoch, 1, __ATOMIC_SEQ_CST);
		} else if (strcmp(line, "trim") == 0) {
			struct mallinfo2 mi;

			malloc_trim(0);
			mi = mallinfo2();
			say("heap %zu bytes in use\n", mi.uordblks + mi.hblkhd);
			say("resident %ld KiB\n", resident_kib());
		} else if (strcmp(line, "quit") == 0) {
			say("ack quit\n");
			break;
		} else {
			say("soak: unknown command '%s'\n", line);
			continue;
		}
		say("ack %s\n", line);
	}
	stop = 1;
	for (i = 0; i <= WORKERS; i++)
		pthread_join(t[i], NULL);
	lib_close();
	report("final", 0);
	return 0;
}
