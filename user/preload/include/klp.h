/*
 * klp.h - the C API of libklp.so, klp's user-space livepatch host.
 *
 * A program started with LD_PRELOAD=libklp.so is live-patchable without calling any
 * of these functions: its threads are the livepatch core's tasks, its executable is
 * "vmlinux", its shared objects are modules, and klpctl controls it over a Unix
 * socket (see libklp's README). This header is for programs that want more: a safe
 * point in a long-running loop, or patches loaded from inside.
 *
 * Link with -lklp (pkg-config --cflags --libs klp), or keep using LD_PRELOAD and
 * declare the functions weak to run without it.
 *
 * Every function that returns int returns 0 on success or a negative errno (the
 * kernel's convention: -EINVAL, -ENOENT, ...). A NULL pointer or a string that is
 * not UTF-8 is -EINVAL. No function throws, unwinds or aborts on bad input. All are
 * thread-safe; none may be called from a signal handler, nor from a livepatch
 * callback (the core is locked there).
 *
 * C89; C++ callers get extern "C" linkage.
 */
#ifndef KLP_H
#define KLP_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * What a patch file's callbacks get (the functions its klp-convert manifest names as
 * "callbacks" of an object): int pre_patch(struct klp_object *obj) may refuse the
 * object with a negative errno; void post_patch / pre_unpatch / post_unpatch
 * (struct klp_object *obj) cannot. They run with klp's core locked: they must not
 * call the functions of this header. The layout matches klp-user's
 * loader::KlpObject.
 */
struct klp_object {
	const char *name; /* NULL for the program itself, else the library's name */
	int patched;      /* whether the object is patched now */
};

/*
 * A safe point (the kernel's klp_update_patch_state): if a transition waits for the
 * calling thread, the thread switches to the transition's target now. Call it where
 * the thread runs no function a patch may replace, e.g. at the head of a worker's
 * loop; a thread that spends its life in such a loop then never holds a transition
 * up, whatever its stack looks like.
 */
void klp_safe_point(void);

/*
 * Loads the livepatch object at PATH (a relocatable object converted by
 * klp-convert) and enables its patch, as klpctl's "load" does. On error nothing of
 * it remains in the process, the reason is written to stderr as one sentence, and a
 * negative errno is returned: -ENOENT (no such file), -EINVAL (bad argument or
 * file), -EEXIST (a patch of that name is loaded), -EBUSY (another transition
 * runs), ...
 */
int klp_load_patch(const char *path);

/*
 * Writes 1 to the patch's "enabled" attribute: reverses a disabling transition that
 * is still running (as in the kernel, an enabled patch cannot be re-enabled and a
 * disabled one is gone). 0, or a negative errno (-ENOENT: no such patch, -EINVAL:
 * not in that state).
 */
int klp_enable(const char *name);

/*
 * Writes 0 to the patch's "enabled" attribute: starts the transition back to the
 * code below the patch. 0, or a negative errno (-ENOENT: no such patch, -EINVAL:
 * not enabled, -EBUSY: another patch is in transition).
 */
int klp_disable(const char *name);

/* The version of libklp.so, a static string such as "0.1.0". */
const char *klp_version(void);

#ifdef __cplusplus
}
#endif

#endif /* KLP_H */
