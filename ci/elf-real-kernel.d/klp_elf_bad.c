// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * klp_elf_bad.c - a livepatch module the kernel must refuse (ci/elf-real-kernel)
 *
 * It patches the function named by the parameter `name` (default: one that does not
 * exist) at position `sympos`, so that the livepatch core fails its enable: "symbol
 * '...' not found in symbol table", or "symbol position N for symbol '...' in object
 * 'vmlinux' not found". The module load then fails with -EINVAL, and the kernel must
 * go on unharmed: the next, valid patch loads.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/seq_file.h>

static char *name = "klp_elf_no_such_function";
module_param(name, charp, 0);
MODULE_PARM_DESC(name, "the function to patch");
static ulong sympos;
module_param(sympos, ulong, 0);
MODULE_PARM_DESC(sympos, "its position among same-named symbols");

static int livepatch_replacement(struct seq_file *m, void *v)
{
	seq_puts(m, "klp_elf_bad\n");
	return 0;
}

static struct klp_func funcs[] = {
	{
		.new_func = livepatch_replacement,
	}, { }
};

static struct klp_object objs[] = {
	{
		.funcs = funcs,
	}, { }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int klp_elf_bad_init(void)
{
	funcs[0].old_name = name;
	funcs[0].old_sympos = sympos;
	return klp_enable_patch(&patch);
}

static void klp_elf_bad_exit(void)
{
}

module_init(klp_elf_bad_init);
module_exit(klp_elf_bad_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ci/elf-real-kernel: a livepatch the kernel must refuse");
MODULE_INFO(livepatch, "Y");
