/*
 * plugfix.c: the replacement of libplug.c's plug_value(), as a livepatch for the
 * library (object "libplug"). plug_calls is libplug.c's static variable: klp-convert
 * turns the reference into .klp.sym.libplug.plug_calls, which the loader resolves when
 * the library arrives.
 */
extern unsigned long plug_calls;

int plug_value_fixed(void);

int plug_value_fixed(void)
{
	plug_calls++;
	return 2;
}
