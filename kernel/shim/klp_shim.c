// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * klp_shim.c - the kernel side of klp, the livepatch core written in Rust
 *
 * This file replaces kernel/livepatch/{core,patch,transition,shadow,state}.c.
 * Every livepatch decision is made by klp's core (linked in as klp_rust.o); this
 * file adapts it to the kernel and keeps include/linux/livepatch.h as it is:
 *
 *  - the API of livepatch modules (klp_enable_patch, klp_shadow_*, klp_get_state,
 *    klp_get_prev_state) and of the rest of the kernel (klp_module_coming/going,
 *    klp_apply_section_relocs, klp_copy_process, klp_update_patch_state,
 *    __klp_sched_try_switch);
 *  - the mechanisms the core asks for through its host (klp_c_*): ftrace ops and their
 *    handler, the task walk, task_call_func, reliable stack traces, the fake signal,
 *    work items, kallsyms, apply_relocate_add, printk with dynamic debug;
 *  - the kobject tree of /sys/kernel/livepatch, whose values and errors come from the
 *    core.
 *
 * Locking: klp_mutex serialises every call into the core, as in the kernel.
 */

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/list.h>
#include <linux/kallsyms.h>
#include <linux/livepatch.h>
#include <linux/livepatch_sched.h>
#include <linux/elf.h>
#include <linux/moduleloader.h>
#include <linux/completion.h>
#include <linux/memory.h>
#include <linux/rcupdate.h>
#include <linux/ftrace.h>
#include <linux/cpu.h>
#include <linux/stacktrace.h>
#include <linux/static_call.h>
#include <linux/sched/task.h>
#include <linux/sched/signal.h>
#include <linux/sched/debug.h>
#include <linux/seqlock.h>
#include <linux/workqueue.h>
#include <linux/kobject.h>
#include <linux/sysfs.h>
#include <linux/syscalls.h>
#include <linux/irqflags.h>
#include <asm/cacheflush.h>

#include "klp_host.h"

static DEFINE_MUTEX(klp_mutex);
static struct kobject *klp_root_kobj;

/* The transition's target, for klp_update_patch_state() on the entry paths. */
static int klp_target_state = KLP_TRANSITION_IDLE;

/* ------------------------------------------------------------------ memory, log */

/*
 * The Rust object's allocator: only the task that runs the core under klp_mutex may
 * sleep for memory; the shadow store's own allocations can come from any context.
 */
void *klp_c_alloc(size_t size, bool may_sleep)
{
	return kmalloc(size, may_sleep && !irqs_disabled() ? GFP_KERNEL : GFP_ATOMIC);
}

/* A shadow variable, with its caller's flags. */
void *klp_c_alloc_gfp(size_t size, unsigned int gfp)
{
	return kmalloc(size, (__force gfp_t)gfp | __GFP_ZERO);
}

unsigned long klp_c_irq_save(void)
{
	unsigned long flags;

	local_irq_save(flags);
	return flags;
}

void klp_c_irq_restore(unsigned long flags)
{
	local_irq_restore(flags);
}

void klp_c_free(void *p)
{
	kfree(p);
}

/*
 * The debug lines of the per-task checks have a call site of their own, in a function
 * of that name: the selftests switch them off with "func klp_try_switch_task -p".
 */
static noinline void klp_try_switch_task(const char *msg, size_t len)
{
	pr_debug("%.*s\n", (int)len, msg);
}

static noinline void klp_debug(const char *msg, size_t len)
{
	pr_debug("%.*s\n", (int)len, msg);
}

void klp_c_log(int level, const char *func, size_t func_len, const char *msg, size_t len)
{
	switch (level) {
	case 3:
		printk(KERN_ERR "%.*s\n", (int)len, msg);
		break;
	case 4:
		printk(KERN_WARNING "%.*s\n", (int)len, msg);
		break;
	case 5:
		printk(KERN_NOTICE "%.*s\n", (int)len, msg);
		break;
	case 6:
		printk(KERN_INFO "%.*s\n", (int)len, msg);
		break;
	default:
		if (func_len == strlen("klp_try_switch_task") &&
		    !memcmp(func, "klp_try_switch_task", func_len))
			klp_try_switch_task(msg, len);
		else
			klp_debug(msg, len);
	}
}

void klp_c_warn(const char *msg, size_t len)
{
	WARN_ONCE(1, "livepatch: %.*s\n", (int)len, msg);
}

void __noreturn klp_c_panic(const char *msg, size_t len)
{
	panic("%.*s\n", (int)len, msg);
}

/* ------------------------------------------------------------------ modules */

bool klp_c_reliable_stacktrace(void)
{
	return klp_have_reliable_stack();
}

bool klp_c_module_is_livepatch(struct module *mod)
{
	return is_livepatch_module(mod);
}

bool klp_c_module_get(struct module *mod)
{
	return try_module_get(mod);
}

void klp_c_module_put(struct module *mod)
{
	module_put(mod);
}

/* klp_write_section_relocs: the core decides, apply_relocate_add writes. */
static int klp_write_section_relocs(struct module *pmod, Elf_Shdr *sechdrs,
				    const char *shstrtab, const char *strtab,
				    unsigned int symndx, unsigned int secndx,
				    const char *objname, bool apply)
{
	int ret = klp_rs_section_relocs(sechdrs, shstrtab, strtab, symndx, secndx,
					objname, apply);

	if (ret == 1)
		return 0;
	if (ret)
		return ret;
	if (apply)
		return apply_relocate_add(sechdrs, strtab, symndx, secndx, pmod);
	clear_relocate_add(sechdrs, strtab, symndx, secndx, pmod);
	return 0;
}

int klp_apply_section_relocs(struct module *pmod, Elf_Shdr *sechdrs,
			     const char *shstrtab, const char *strtab,
			     unsigned int symndx, unsigned int secndx,
			     const char *objname)
{
	return klp_write_section_relocs(pmod, sechdrs, shstrtab, strtab, symndx,
					secndx, objname, true);
}

int klp_c_object_relocs(struct module *pmod, const char *objname, bool apply)
{
	struct klp_modinfo *info = pmod->klp_info;
	int i, ret = 0;

	for (i = 1; i < info->hdr.e_shnum; i++) {
		Elf_Shdr *sec = info->sechdrs + i;

		if (!(sec->sh_flags & SHF_RELA_LIVEPATCH))
			continue;
		ret = klp_write_section_relocs(pmod, info->sechdrs, info->secstrings,
					       pmod->core_kallsyms.strtab, info->symndx,
					       i, objname, apply);
		if (ret)
			break;
	}
	return ret;
}

/* ------------------------------------------------------------------ symbols */

struct klp_c_sym_args {
	const char *name;
	int (*cb)(void *ctx, unsigned long addr);
	void *ctx;
};

static int klp_c_match_cb(void *data, unsigned long addr)
{
	struct klp_c_sym_args *args = data;

	return args->cb(args->ctx, addr);
}

static int klp_c_module_sym_cb(void *data, const char *name, unsigned long addr)
{
	struct klp_c_sym_args *args = data;

	if (strcmp(args->name, name))
		return 0;
	return args->cb(args->ctx, addr);
}

void klp_c_for_each_symbol(const char *obj, const char *name,
			   int (*cb)(void *ctx, unsigned long addr), void *ctx)
{
	struct klp_c_sym_args args = { .name = name, .cb = cb, .ctx = ctx };

	if (obj)
		module_kallsyms_on_each_symbol(obj, klp_c_module_sym_cb, &args);
	else
		kallsyms_on_each_match_symbol(klp_c_match_cb, name, &args);
}

bool klp_c_symbol_size(unsigned long addr, unsigned long *size)
{
	return kallsyms_lookup_size_offset(addr, size, NULL);
}

/* ------------------------------------------------------------------ ftrace */

/*
 * One registered function: its ftrace ops and the view the core published for it, in
 * a latch (two copies), so that the handler, which may run in any context, never
 * waits for the writer.
 */
struct klp_c_ops {
	struct list_head node;
	unsigned long site;
	struct ftrace_ops fops;
	seqcount_latch_t seq;
	struct klp_c_view view[2];
};

static LIST_HEAD(klp_c_ops_list);

static struct klp_c_ops *klp_c_find_ops(unsigned long site)
{
	struct klp_c_ops *ops;

	list_for_each_entry(ops, &klp_c_ops_list, node)
		if (ops->site == site)
			return ops;
	return NULL;
}

static void notrace klp_c_ftrace_handler(unsigned long ip, unsigned long parent_ip,
					 struct ftrace_ops *fops, struct ftrace_regs *fregs)
{
	struct klp_c_ops *ops = container_of(fops, struct klp_c_ops, fops);
	struct klp_c_view v;
	unsigned int seq;
	bool anomaly = false;
	u64 to;
	int bit;

	/* Disables preemption, which klp_synchronize_transition() relies on. */
	bit = ftrace_test_recursion_trylock(ip, parent_ip);
	if (WARN_ON_ONCE(bit < 0))
		return;

	do {
		seq = raw_read_seqcount_latch(&ops->seq);
		v = ops->view[seq & 1];
	} while (raw_read_seqcount_latch_retry(&ops->seq, seq));

	if (!v.valid)
		goto unlock;

	/*
	 * Order the transition flag read before current->patch_state, pairing with the
	 * write barrier between the task states and the publication of the view.
	 */
	smp_rmb();

	to = klp_rs_decide(&v, READ_ONCE(current->patch_state), &anomaly);
	WARN_ON_ONCE(anomaly);
	if (to)
		ftrace_regs_set_instruction_pointer(fregs, to);
unlock:
	ftrace_test_recursion_unlock(bit);
}

unsigned long klp_c_ftrace_location(unsigned long addr)
{
	return ftrace_location(addr);
}

int klp_c_hook_register(unsigned long site, int *stage)
{
	struct klp_c_ops *ops;
	int ret;

	*stage = 0;
	ops = kzalloc(sizeof(*ops), GFP_KERNEL);
	if (!ops)
		return -ENOMEM;
	ops->site = site;
	seqcount_latch_init(&ops->seq);
	ops->fops.func = klp_c_ftrace_handler;
	ops->fops.flags = FTRACE_OPS_FL_DYNAMIC |
#ifndef CONFIG_HAVE_DYNAMIC_FTRACE_WITH_ARGS
			  FTRACE_OPS_FL_SAVE_REGS |
#endif
			  FTRACE_OPS_FL_IPMODIFY |
			  FTRACE_OPS_FL_PERMANENT;

	ret = ftrace_set_filter_ip(&ops->fops, site, 0, 0);
	if (ret) {
		kfree(ops);
		return ret;
	}
	ret = register_ftrace_function(&ops->fops);
	if (ret) {
		*stage = 1;
		ftrace_set_filter_ip(&ops->fops, site, 1, 0);
		kfree(ops);
		return ret;
	}
	list_add(&ops->node, &klp_c_ops_list);
	return 0;
}

void klp_c_hook_unregister(unsigned long site)
{
	struct klp_c_ops *ops = klp_c_find_ops(site);

	if (WARN_ON(!ops))
		return;
	WARN_ON(unregister_ftrace_function(&ops->fops));
	WARN_ON(ftrace_set_filter_ip(&ops->fops, site, 1, 0));
	list_del(&ops->node);
	kfree(ops);
}

void klp_c_hook_publish(unsigned long site, const struct klp_c_view *view)
{
	struct klp_c_ops *ops = klp_c_find_ops(site);

	if (!ops)
		return;
	/* raw_write_seqcount_latch() has the write barriers between the copies. */
	raw_write_seqcount_latch(&ops->seq);
	ops->view[0] = *view;
	raw_write_seqcount_latch(&ops->seq);
	ops->view[1] = *view;
}

/* ------------------------------------------------------------------ tasks */

void klp_c_for_each_task(void (*cb)(void *ctx, struct task_struct *t), void *ctx)
{
	struct task_struct *g, *task;

	read_lock(&tasklist_lock);
	for_each_process_thread(g, task)
		cb(ctx, task);
	read_unlock(&tasklist_lock);
}

void klp_c_for_each_idle_task(void (*cb)(void *ctx, struct task_struct *t, unsigned int cpu,
					 bool online), void *ctx)
{
	unsigned int cpu;

	for_each_possible_cpu(cpu)
		cb(ctx, idle_task(cpu), cpu, cpu_online(cpu));
}

struct task_struct *klp_c_current(void)
{
	return current;
}

int klp_c_patch_state(struct task_struct *t)
{
	return READ_ONCE(t->patch_state);
}

void klp_c_set_patch_state(struct task_struct *t, int s)
{
	WRITE_ONCE(t->patch_state, s);
}

bool klp_c_patch_pending(struct task_struct *t)
{
	return test_tsk_thread_flag(t, TIF_PATCH_PENDING);
}

void klp_c_set_patch_pending(struct task_struct *t, bool pending)
{
	if (pending)
		set_tsk_thread_flag(t, TIF_PATCH_PENDING);
	else
		clear_tsk_thread_flag(t, TIF_PATCH_PENDING);
}

int klp_c_task_ident(struct task_struct *t, char comm[TASK_COMM_LEN])
{
	memcpy(comm, t->comm, TASK_COMM_LEN);
	comm[TASK_COMM_LEN - 1] = 0;
	return task_pid_nr(t);
}

bool klp_c_is_kthread(struct task_struct *t)
{
	return t->flags & PF_KTHREAD;
}

bool klp_c_task_running_elsewhere(struct task_struct *t)
{
	return task_curr(t) && t != current;
}

int klp_c_stack_trace_reliable(struct task_struct *t, unsigned long *entries, unsigned int n)
{
	return stack_trace_save_tsk_reliable(t, entries, n);
}

struct klp_c_call {
	void (*cb)(void *ctx);
	void *ctx;
};

static int klp_c_task_call_fn(struct task_struct *t, void *arg)
{
	struct klp_c_call *call = arg;

	call->cb(call->ctx);
	return 0;
}

void klp_c_task_call(struct task_struct *t, void (*cb)(void *ctx), void *ctx)
{
	struct klp_c_call call = { .cb = cb, .ctx = ctx };

	task_call_func(t, klp_c_task_call_fn, &call);
}

void klp_c_fake_signal(struct task_struct *t)
{
	set_notify_signal(t);
}

void klp_c_wake_kthread(struct task_struct *t)
{
	wake_up_state(t, TASK_INTERRUPTIBLE);
}

void klp_c_wake_cpu(unsigned int cpu)
{
	wake_up_if_idle(cpu);
}

static void klp_sync(struct work_struct *work)
{
}

/*
 * Some functions run with RCU not watching; hard-force a pass through the scheduler
 * on every CPU instead of relying on RCU (see the kernel's klp_synchronize_transition).
 */
void klp_c_synchronize(void)
{
	schedule_on_each_cpu(klp_sync);
}

void klp_c_publish_target(int state)
{
	WRITE_ONCE(klp_target_state, state);
	/* Before any TIF_PATCH_PENDING the core sets for this target. */
	smp_wmb();
}

void klp_update_patch_state(struct task_struct *task)
{
	/*
	 * Preemption off: a transition cannot end between the flag and the target read
	 * (klp_synchronize_transition() waits for this section).
	 */
	preempt_disable_notrace();
	/* test_and_clear_tsk_thread_flag() is a full barrier. */
	if (test_and_clear_tsk_thread_flag(task, TIF_PATCH_PENDING))
		task->patch_state = READ_ONCE(klp_target_state);
	preempt_enable_notrace();
}

void klp_copy_process(struct task_struct *child)
{
	/* Serialised against the core's task walks by tasklist_lock (held by fork). */
	if (test_tsk_thread_flag(current, TIF_PATCH_PENDING))
		set_tsk_thread_flag(child, TIF_PATCH_PENDING);
	else
		clear_tsk_thread_flag(child, TIF_PATCH_PENDING);
	child->patch_state = current->patch_state;
}

/* ------------------------------------------------------------------ cond_resched */

#if defined(CONFIG_PREEMPT_DYNAMIC) && defined(CONFIG_HAVE_PREEMPT_DYNAMIC_CALL)
#define klp_cond_resched_enable() sched_dynamic_klp_enable()
#define klp_cond_resched_disable() sched_dynamic_klp_disable()
#else
DEFINE_STATIC_KEY_FALSE(klp_sched_try_switch_key);
#define klp_cond_resched_enable() static_branch_enable(&klp_sched_try_switch_key)
#define klp_cond_resched_disable() static_branch_disable(&klp_sched_try_switch_key)
#endif

static bool klp_c_sched_key_on;

/*
 * cond_resched() of a task with TIF_PATCH_PENDING: try to switch it here. The core is
 * only reached when klp_mutex is free; otherwise a later cond_resched(), the retry
 * work or the fake signal switches the task.
 */
void __klp_sched_try_switch(void)
{
	if (likely(!klp_patch_pending(current)))
		return;
	if (!mutex_trylock(&klp_mutex))
		return;
	preempt_disable();
	if (klp_patch_pending(current)) {
		/* Order the TIF_PATCH_PENDING read before the core's reads. */
		smp_rmb();
		klp_rs_sched_try_switch();
	}
	preempt_enable();
	mutex_unlock(&klp_mutex);
}

/* ------------------------------------------------------------------ work */

static void klp_c_after_op(void);

static void klp_transition_work_fn(struct work_struct *work)
{
	mutex_lock(&klp_mutex);
	klp_rs_retry_work();
	/* The transition may have completed: nop directories and the static key follow. */
	klp_c_after_op();
	mutex_unlock(&klp_mutex);
}
static DECLARE_DELAYED_WORK(klp_transition_work, klp_transition_work_fn);

void klp_c_schedule_retry(void)
{
	schedule_delayed_work(&klp_transition_work, round_jiffies_relative(HZ));
}

/* ------------------------------------------------------------------ callbacks */

int klp_c_callback(struct klp_object *obj, enum klp_c_callback kind)
{
	struct module *mod = NULL;

	if (obj->name) {
		preempt_disable();
		mod = find_module(obj->name);
		preempt_enable();
	}
	obj->mod = mod;

	switch (kind) {
	case KLP_C_PRE_PATCH:
		return obj->callbacks.pre_patch ? obj->callbacks.pre_patch(obj) : 0;
	case KLP_C_POST_PATCH:
		if (obj->callbacks.post_patch)
			obj->callbacks.post_patch(obj);
		break;
	case KLP_C_PRE_UNPATCH:
		if (obj->callbacks.pre_unpatch)
			obj->callbacks.pre_unpatch(obj);
		break;
	case KLP_C_POST_UNPATCH:
		if (obj->callbacks.post_unpatch)
			obj->callbacks.post_unpatch(obj);
		break;
	}
	return 0;
}

/* ------------------------------------------------------------------ sysfs */

/*
 * The directories under a patch (objects and functions) are klp_c_node kobjects on
 * the patch's obj_list; the patch's own directory is its embedded kobject.
 */
struct klp_c_node {
	struct kobject kobj;
	struct list_head node;
};

/* Live patches (those with a directory), on their list member. */
static LIST_HEAD(klp_c_patches);

#define KLP_C_DEPTH 4

/* The path of @kobj under /sys/kernel/livepatch, then @last; returns its length. */
static int klp_c_path(struct kobject *kobj, const char *last, const char *path[KLP_C_DEPTH])
{
	const char *rev[KLP_C_DEPTH];
	int n = 0, i;

	for (; kobj && kobj != klp_root_kobj; kobj = kobj->parent) {
		if (n == KLP_C_DEPTH - 1)
			return -ENOENT;
		rev[n++] = kobject_name(kobj);
	}
	for (i = 0; i < n; i++)
		path[i] = rev[n - 1 - i];
	if (last)
		path[n++] = last;
	return n;
}

static ssize_t klp_c_attr_show(struct kobject *kobj, struct attribute *attr, char *buf)
{
	const char *path[KLP_C_DEPTH];
	int n = klp_c_path(kobj, attr->name, path);
	ssize_t ret;

	if (n < 0)
		return n;
	/*
	 * Directories go away under klp_mutex (a replaced patch's nop functions), and
	 * removing one waits for the readers of its attributes: back off instead of
	 * waiting for the mutex, and let the read start again.
	 */
	if (!mutex_trylock(&klp_mutex))
		return restart_syscall();
	ret = klp_rs_sysfs_show(path, n, buf);
	mutex_unlock(&klp_mutex);
	return ret;
}

static ssize_t klp_c_attr_store(struct kobject *kobj, struct attribute *attr,
				const char *buf, size_t count)
{
	const char *path[KLP_C_DEPTH];
	int n = klp_c_path(kobj, attr->name, path);
	ssize_t ret;

	if (n < 0)
		return n;
	mutex_lock(&klp_mutex);
	ret = klp_rs_sysfs_store(path, n, buf, count);
	klp_c_after_op();
	mutex_unlock(&klp_mutex);
	return ret;
}

static const struct sysfs_ops klp_c_sysfs_ops = {
	.show = klp_c_attr_show,
	.store = klp_c_attr_store,
};

static void klp_c_patch_release(struct kobject *kobj)
{
	struct klp_patch *patch = container_of(kobj, struct klp_patch, kobj);

	complete(&patch->finish);
}

static void klp_c_node_release(struct kobject *kobj)
{
	kfree(container_of(kobj, struct klp_c_node, kobj));
}

static const struct kobj_type klp_c_ktype_patch = {
	.release = klp_c_patch_release,
	.sysfs_ops = &klp_c_sysfs_ops,
};

static const struct kobj_type klp_c_ktype_node = {
	.release = klp_c_node_release,
	.sysfs_ops = &klp_c_sysfs_ops,
};

/*
 * An attribute file; its name and mode come from the core. The core has a handful of
 * attribute names, so each (name, mode) is allocated once and shared by every
 * directory that has it, as a kobj_type's default attributes are.
 */
struct klp_c_attr {
	struct list_head node;
	struct attribute attr;
	char name[];
};

static LIST_HEAD(klp_c_attrs);

static struct attribute *klp_c_attr_get(const char *name, size_t len, umode_t mode)
{
	struct klp_c_attr *a;

	list_for_each_entry(a, &klp_c_attrs, node)
		if (a->attr.mode == mode && strlen(a->name) == len && !memcmp(a->name, name, len))
			return &a->attr;
	a = kzalloc(sizeof(*a) + len + 1, GFP_KERNEL);
	if (!a)
		return NULL;
	memcpy(a->name, name, len);
	sysfs_attr_init(&a->attr);
	a->attr.name = a->name;
	a->attr.mode = mode;
	list_add(&a->node, &klp_c_attrs);
	return &a->attr;
}

struct klp_c_build {
	struct klp_patch *patch;
	struct kobject *parent;
	int err;
};

static void klp_c_build_entry(void *ctx, const char *name, size_t len, int mode)
{
	struct klp_c_build *b = ctx;
	struct klp_c_node *node;
	struct attribute *attr;

	if (b->err)
		return;
	if (mode & S_IFDIR) {
		node = kzalloc(sizeof(*node), GFP_KERNEL);
		if (!node) {
			b->err = -ENOMEM;
			return;
		}
		INIT_LIST_HEAD(&node->node);
		b->err = kobject_init_and_add(&node->kobj, &klp_c_ktype_node, b->parent,
					      "%.*s", (int)len, name);
		if (b->err) {
			kobject_put(&node->kobj);
			return;
		}
		list_add_tail(&node->node, &b->patch->obj_list);
		return;
	}
	attr = klp_c_attr_get(name, len, mode & 0777);
	b->err = attr ? sysfs_create_file(b->parent, attr) : -ENOMEM;
}

static int klp_c_build_dir(struct klp_patch *patch, struct kobject *kobj)
{
	struct klp_c_build b = { .patch = patch, .parent = kobj };
	const char *path[KLP_C_DEPTH];
	struct klp_c_node *node;
	struct list_head *first_new = patch->obj_list.prev;
	int n = klp_c_path(kobj, NULL, path);
	int ret;

	if (n < 0)
		return n;
	ret = klp_rs_sysfs_list(path, n, klp_c_build_entry, &b);
	if (ret)
		return ret;
	if (b.err)
		return b.err;
	/* Then the new subdirectories, one level down. */
	node = list_entry(first_new->next, struct klp_c_node, node);
	list_for_each_entry_from(node, &patch->obj_list, node) {
		if (node->kobj.parent != kobj)
			continue;
		ret = klp_c_build_dir(patch, &node->kobj);
		if (ret)
			return ret;
	}
	return 0;
}

/* Creates the directory tree of a patch the core just enabled. */
static int klp_c_sysfs_add(struct klp_patch *patch)
{
	int ret;

	INIT_LIST_HEAD(&patch->obj_list);
	init_completion(&patch->finish);
	ret = kobject_init_and_add(&patch->kobj, &klp_c_ktype_patch, klp_root_kobj, "%s",
				   patch->mod->name);
	if (ret)
		return ret;
	list_add_tail(&patch->list, &klp_c_patches);
	return klp_c_build_dir(patch, &patch->kobj);
}

/*
 * After every operation of the core: directories the core no longer has (the nop
 * functions of a replace, once it completed) go, and cond_resched()'s key follows the
 * core's.
 */
static void klp_c_after_op(void)
{
	struct klp_patch *patch;
	struct klp_c_node *node, *tmp;
	const char *path[KLP_C_DEPTH];
	bool key;
	int n;

	lockdep_assert_held(&klp_mutex);
	list_for_each_entry(patch, &klp_c_patches, list) {
		list_for_each_entry_safe_reverse(node, tmp, &patch->obj_list, node) {
			n = klp_c_path(&node->kobj, NULL, path);
			if (n >= 0 && klp_rs_sysfs_node(path, n) >= 0)
				continue;
			list_del(&node->node);
			kobject_put(&node->kobj);
		}
	}

	key = klp_rs_sched_key();
	if (key != klp_c_sched_key_on) {
		klp_c_sched_key_on = key;
		if (key)
			klp_cond_resched_enable();
		else
			klp_cond_resched_disable();
	}
}

/* The patch's free_work: the directories go first, then the core lets go of it. */
static void klp_c_free_work_fn(struct work_struct *work)
{
	struct klp_patch *patch = container_of(work, struct klp_patch, free_work);
	struct klp_c_node *node, *tmp;
	LIST_HEAD(nodes);

	mutex_lock(&klp_mutex);
	list_del_init(&patch->list);
	list_splice_init(&patch->obj_list, &nodes);
	mutex_unlock(&klp_mutex);

	list_for_each_entry_safe_reverse(node, tmp, &nodes, node) {
		list_del(&node->node);
		kobject_put(&node->kobj);
	}
	kobject_put(&patch->kobj);
	wait_for_completion(&patch->finish);

	mutex_lock(&klp_mutex);
	klp_rs_free_work(patch);
	klp_c_after_op();
	mutex_unlock(&klp_mutex);
}

void klp_c_schedule_free(struct klp_patch *patch)
{
	INIT_WORK(&patch->free_work, klp_c_free_work_fn);
	schedule_work(&patch->free_work);
}

/* ------------------------------------------------------------------ the API */

static bool klp_c_obj_has_callbacks(struct klp_object *obj)
{
	return obj->callbacks.pre_patch || obj->callbacks.post_patch ||
	       obj->callbacks.pre_unpatch || obj->callbacks.post_unpatch;
}

/* The static arrays of @patch as a description for the core. */
static struct klp_rs_desc *klp_c_describe(struct klp_patch *patch, int *err)
{
	struct klp_rs_desc *d;
	struct klp_object *obj;
	struct klp_func *func;
	struct klp_state *state;

	*err = -ENOMEM;
	d = klp_rs_desc_new(patch->mod->name, patch->replace);
	if (!d)
		return NULL;
	klp_for_each_object_static(patch, obj) {
		*err = klp_rs_desc_object(d, obj->name, obj->funcs != NULL, obj,
					  klp_c_obj_has_callbacks(obj));
		if (*err)
			goto fail;
		if (!obj->funcs)
			continue;
		klp_for_each_func_static(obj, func) {
			*err = klp_rs_desc_func(d, func->old_name, (unsigned long)func->new_func,
						func->old_sympos);
			if (*err)
				goto fail;
		}
	}
	if (patch->states) {
		for (state = patch->states; state->id; state++) {
			*err = klp_rs_desc_state(d, state->id, state->version, state);
			if (*err)
				goto fail;
		}
	}
	*err = 0;
	return d;
fail:
	klp_rs_desc_free(d);
	return NULL;
}

int klp_enable_patch(struct klp_patch *patch)
{
	struct klp_rs_desc *d;
	int ret;

	if (!patch || !patch->mod || !patch->objs)
		return -EINVAL;
	if (!klp_root_kobj)
		return -ENODEV;

	d = klp_c_describe(patch, &ret);
	if (!d)
		return ret;

	mutex_lock(&klp_mutex);
	INIT_LIST_HEAD(&patch->list);
	ret = klp_rs_enable(d, patch, patch->mod);
	if (!ret && klp_c_sysfs_add(patch))
		pr_warn("livepatch: '%s': could not create all of its sysfs directories\n",
			patch->mod->name);
	klp_c_after_op();
	mutex_unlock(&klp_mutex);
	return ret;
}
EXPORT_SYMBOL_GPL(klp_enable_patch);

int klp_module_coming(struct module *mod)
{
	int ret;

	if (WARN_ON(mod->state != MODULE_STATE_COMING))
		return -EINVAL;

	mutex_lock(&klp_mutex);
	ret = klp_rs_module_coming(mod->name);
	klp_c_after_op();
	mutex_unlock(&klp_mutex);
	return ret;
}

void klp_module_going(struct module *mod)
{
	if (WARN_ON(mod->state != MODULE_STATE_GOING &&
		    mod->state != MODULE_STATE_COMING))
		return;

	mutex_lock(&klp_mutex);
	klp_rs_module_going(mod->name);
	klp_c_after_op();
	mutex_unlock(&klp_mutex);
}

struct klp_state *klp_get_state(struct klp_patch *patch, unsigned long id)
{
	struct klp_state *state;

	if (!patch->states)
		return NULL;
	for (state = patch->states; state->id; state++)
		if (state->id == id)
			return state;
	return NULL;
}
EXPORT_SYMBOL_GPL(klp_get_state);

struct klp_state *klp_get_prev_state(unsigned long id)
{
	return klp_rs_get_prev_state(id);
}
EXPORT_SYMBOL_GPL(klp_get_prev_state);

/* ------------------------------------------------------------------ shadow variables */

/*
 * The core's store: lock-free look-ups; a new variable is allocated with the caller's
 * @gfp_flags before any lock; each shard's spin lock is held with interrupts off.
 */
void *klp_shadow_get(void *obj, unsigned long id)
{
	return klp_rs_shadow_get(obj, id);
}
EXPORT_SYMBOL_GPL(klp_shadow_get);

static void *klp_c_shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp_flags,
				klp_shadow_ctor_t ctor, void *ctor_data, bool get_or)
{
	void *ret;
	int err;

	if (gfpflags_allow_blocking(gfp_flags))
		might_sleep();
	ret = klp_rs_shadow_alloc(obj, id, size, (__force unsigned int)gfp_flags, ctor,
				  ctor_data, get_or, &err);
	if (!ret && err == -EEXIST)
		WARN(1, "Duplicate shadow variable <%p, %lx>\n", obj, id);
	else if (!ret && err != -ENOMEM)
		pr_err("livepatch: Failed to construct shadow variable <%p, %lx> (%d)\n",
		       obj, id, err);
	return ret;
}

void *klp_shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp_flags,
		       klp_shadow_ctor_t ctor, void *ctor_data)
{
	return klp_c_shadow_alloc(obj, id, size, gfp_flags, ctor, ctor_data, false);
}
EXPORT_SYMBOL_GPL(klp_shadow_alloc);

void *klp_shadow_get_or_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp_flags,
			      klp_shadow_ctor_t ctor, void *ctor_data)
{
	return klp_c_shadow_alloc(obj, id, size, gfp_flags, ctor, ctor_data, true);
}
EXPORT_SYMBOL_GPL(klp_shadow_get_or_alloc);

void klp_shadow_free(void *obj, unsigned long id, klp_shadow_dtor_t dtor)
{
	klp_rs_shadow_free(obj, id, dtor);
}
EXPORT_SYMBOL_GPL(klp_shadow_free);

void klp_shadow_free_all(unsigned long id, klp_shadow_dtor_t dtor)
{
	klp_rs_shadow_free_all(id, dtor);
}
EXPORT_SYMBOL_GPL(klp_shadow_free_all);

/* ------------------------------------------------------------------ init */

static int __init klp_init(void)
{
	klp_root_kobj = kobject_create_and_add("livepatch", kernel_kobj);
	if (!klp_root_kobj)
		return -ENOMEM;
	return 0;
}

module_init(klp_init);
