/*
 * libplug.c: a plug-in prog.c loads with dlopen while it runs.
 *
 * The bug: plug_value() should return 2. ci/patchfile loads plugfix.klp.o, a patch for
 * this library, before the program loads the library: the patch takes effect when it
 * arrives, so the program never sees the bug.
 */
static unsigned long plug_calls;

unsigned long plug_count(void);
int plug_value(void);

unsigned long plug_count(void)
{
	return plug_calls;
}

int plug_value(void)
{
	plug_calls++;
	return 1;
}
