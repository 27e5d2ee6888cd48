// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * A livepatch for Debian 12's kernel (6.1) that reaches code no module can link
 * against, built by ci/elf-real-kernel and converted by klp-convert.
 *
 * Like the kernel's samples/livepatch/livepatch-sample.c it replaces
 * cmdline_proc_show() (/proc/cmdline). The new function uses three symbols of
 * vmlinux that the module loader cannot resolve, because none of them is exported:
 *
 *   version_proc_show   a static function of fs/proc/version.c  ('t' in System.map)
 *   log_buf_len         a static variable of kernel/printk/printk.c ('d')
 *   saved_command_line  a global variable of init/main.c, not exported ('B')
 *
 * They compile as ordinary extern references; modpost calls them undefined
 * (KBUILD_MODPOST_WARN=1 lets the .ko be written), and klp-convert turns them into
 * .klp.sym.vmlinux.<name>,<pos> symbols whose relocations the kernel's livepatch
 * core writes (.klp.rela.vmlinux.* sections) while the module loads.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/seq_file.h>

/* Not exported, not static: declared by <linux/init.h> already. */
extern char *saved_command_line;
/* static u32 log_buf_len = __LOG_BUF_LEN; in kernel/printk/printk.c */
extern u32 log_buf_len;
/* static int version_proc_show(struct seq_file *m, void *v); in fs/proc/version.c */
extern int version_proc_show(struct seq_file *m, void *v);

static int livepatch_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "%s\n", saved_command_line);
	seq_printf(m, "livepatched: log_buf_len=%u; version_proc_show: ", log_buf_len);
	return version_proc_show(m, v);
}

static struct klp_func funcs[] = {
	{
		.old_name = "cmdline_proc_show",
		.new_func = livepatch_cmdline_proc_show,
	}, { }
};

static struct klp_object objs[] = {
	{
		/* name being NULL means vmlinux */
		.funcs = funcs,
	}, { }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int klp_elf_real_kernel_init(void)
{
	return klp_enable_patch(&patch);
}

static void klp_elf_real_kernel_exit(void)
{
}

module_init(klp_elf_real_kernel_init);
module_exit(klp_elf_real_kernel_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ci/elf-real-kernel: a livepatch using static symbols of vmlinux, converted by klp-convert");
MODULE_INFO(livepatch, "Y");
