/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * klp_host.h - the interface between klp's Rust core (klp_rust.o, kernel/host in the
 * klp tree) and its C shim (klp_shim.c): klp_rs_* are the core's entry points,
 * klp_c_* the mechanisms the core's host asks the kernel for.
 */
#ifndef _KLP_HOST_H
#define _KLP_HOST_H

#include <linux/types.h>
#include <linux/livepatch.h>
#include <linux/sched.h>


/* What the ftrace handler of one patched function decides from (klp's CView). */
struct klp_c_view {
	u64 top;		/* 0: the original function */
	u64 below;		/* 0: the original function */
	u8 top_transition;
	u8 valid;
};
static_assert(sizeof(struct klp_c_view) == 24);
static_assert(offsetof(struct klp_c_view, top_transition) == 16);
static_assert(offsetof(struct klp_c_view, valid) == 17);

enum klp_c_callback { KLP_C_PRE_PATCH, KLP_C_POST_PATCH, KLP_C_PRE_UNPATCH, KLP_C_POST_UNPATCH };

struct klp_rs_desc;
struct klp_rs_desc *klp_rs_desc_new(const char *name, bool replace);
void klp_rs_desc_free(struct klp_rs_desc *d);
int klp_rs_desc_object(struct klp_rs_desc *d, const char *name, bool has_funcs,
		       struct klp_object *obj, bool has_callbacks);
int klp_rs_desc_func(struct klp_rs_desc *d, const char *old_name, unsigned long new_func,
		     unsigned long sympos);
int klp_rs_desc_state(struct klp_rs_desc *d, unsigned long id, unsigned int version,
		      struct klp_state *state);
int klp_rs_enable(struct klp_rs_desc *d, struct klp_patch *patch, struct module *mod);
int klp_rs_module_coming(const char *name);
void klp_rs_module_going(const char *name);
void klp_rs_retry_work(void);
void klp_rs_free_work(struct klp_patch *patch);
void klp_rs_sched_try_switch(void);
bool klp_rs_sched_key(void);
int klp_rs_sysfs_node(const char *const *path, unsigned int n);
int klp_rs_sysfs_list(const char *const *path, unsigned int n,
		      void (*cb)(void *ctx, const char *name, size_t len, int mode), void *ctx);
ssize_t klp_rs_sysfs_show(const char *const *path, unsigned int n, char *buf);
ssize_t klp_rs_sysfs_store(const char *const *path, unsigned int n, const char *buf, size_t len);
u64 klp_rs_decide(const struct klp_c_view *view, int state, bool *anomaly);
struct klp_state *klp_rs_get_prev_state(unsigned long id);
int klp_rs_section_relocs(Elf_Shdr *sechdrs, const char *shstrtab, const char *strtab,
			  unsigned int symndx, unsigned int secndx, const char *objname,
			  bool apply);
void *klp_rs_shadow_get(void *obj, unsigned long id);
void *klp_rs_shadow_alloc(void *obj, unsigned long id, size_t size, unsigned int gfp,
			  klp_shadow_ctor_t ctor, void *ctor_data, bool get_or, int *err);
void klp_rs_shadow_free(void *obj, unsigned long id, klp_shadow_dtor_t dtor);
void klp_rs_shadow_free_all(unsigned long id, klp_shadow_dtor_t dtor);


/* What the Rust host calls (kernel/host/src/ffi.rs declares the same). */
void *klp_c_alloc(size_t size, bool may_sleep);
void *klp_c_alloc_gfp(size_t size, unsigned int gfp);
unsigned long klp_c_irq_save(void);
void klp_c_irq_restore(unsigned long flags);
void klp_c_free(void *p);
void klp_c_log(int level, const char *func, size_t func_len, const char *msg, size_t len);
void klp_c_warn(const char *msg, size_t len);
void __noreturn klp_c_panic(const char *msg, size_t len);
bool klp_c_reliable_stacktrace(void);
bool klp_c_module_is_livepatch(struct module *mod);
bool klp_c_module_get(struct module *mod);
void klp_c_module_put(struct module *mod);
int klp_c_object_relocs(struct module *pmod, const char *objname, bool apply);
void klp_c_for_each_symbol(const char *obj, const char *name,
			   int (*cb)(void *ctx, unsigned long addr), void *ctx);
bool klp_c_symbol_size(unsigned long addr, unsigned long *size);
unsigned long klp_c_ftrace_location(unsigned long addr);
int klp_c_hook_register(unsigned long site, int *stage);
void klp_c_hook_unregister(unsigned long site);
void klp_c_hook_publish(unsigned long site, const struct klp_c_view *view);
void klp_c_for_each_task(void (*cb)(void *ctx, struct task_struct *t), void *ctx);
void klp_c_for_each_idle_task(void (*cb)(void *ctx, struct task_struct *t, unsigned int cpu,
					 bool online), void *ctx);
struct task_struct *klp_c_current(void);
int klp_c_patch_state(struct task_struct *t);
void klp_c_set_patch_state(struct task_struct *t, int s);
bool klp_c_patch_pending(struct task_struct *t);
void klp_c_set_patch_pending(struct task_struct *t, bool pending);
int klp_c_task_ident(struct task_struct *t, char comm[TASK_COMM_LEN]);
bool klp_c_is_kthread(struct task_struct *t);
bool klp_c_task_running_elsewhere(struct task_struct *t);
int klp_c_stack_trace_reliable(struct task_struct *t, unsigned long *entries, unsigned int n);
void klp_c_task_call(struct task_struct *t, void (*cb)(void *ctx), void *ctx);
void klp_c_fake_signal(struct task_struct *t);
void klp_c_wake_kthread(struct task_struct *t);
void klp_c_wake_cpu(unsigned int cpu);
void klp_c_synchronize(void);
void klp_c_publish_target(int state);
void klp_c_schedule_retry(void);
void klp_c_schedule_free(struct klp_patch *patch);
int klp_c_callback(struct klp_object *obj, enum klp_c_callback kind);

#endif /* _KLP_HOST_H */
