/*
 * fix.c: the replacement of prog.c's compute(), as a livepatch.
 *
 * It uses prog.c's static function square() and static variables bias and computed:
 * ordinary linking cannot reach them, so klp-convert turns the references into
 * .klp.sym.vmlinux.* symbols (vmlinux: the program itself), which the loader resolves
 * in the running process.
 */
extern long bias;
extern unsigned long computed;
long square(long x);

long compute_fixed(long x);

long compute_fixed(long x)
{
	__atomic_fetch_add(&computed, 1, __ATOMIC_RELAXED);
	return square(x) + bias;
}
