//! Patch files loaded into this process: a C function of the test executable replaced
//! by a patch object that klp-convert turned into a livepatch object against this very
//! executable (its static helper and counter reached through livepatch symbols, the C
//! library through the loader's symbol resolution), enabled, disabled, loaded again;
//! and bad files refused with nothing left behind.

#[path = "common/scratch.rs"]
mod scratch;

use std::path::{Path, PathBuf};
use std::time::Duration;

#[path = "common/loadfix.rs"]
mod loadfix;

use klp_user::loader::LoadOptions;
use klp_user::{Config, Process};

unsafe extern "C" {
    fn klp_loadee_compute(x: i32) -> i32;
    fn klp_loadee_counter() -> i32;
    fn klp_loadee_helper_ref(x: i32) -> i32;
    fn klp_loadee_inl_caller(x: i32) -> i32;
    static klp_loadee_inl_ptr: extern "C" fn(i32) -> i32;
}

fn compute(x: i32) -> i32 {
    // SAFETY: a plain C function of tests/c/loadee.c, linked into this executable.
    unsafe { klp_loadee_compute(x) }
}

fn counter() -> i32 {
    // SAFETY: as above.
    unsafe { klp_loadee_counter() }
}

/// The tests share the patched function and the patch names: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn process() -> (&'static Process, std::sync::MutexGuard<'static, ()>) {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = Process::init(Config::default());
    // SAFETY: as above (keeps the static helper referenced).
    assert_eq!(unsafe { klp_loadee_helper_ref(1) }, 10);
    (p, g)
}

fn dir() -> PathBuf {
    scratch::scratch_dir("klp-loader")
}

/// tests/c/loadfix.o converted against this executable and libklploadlib.so, with
/// `manifest`.
fn convert(manifest: &str, name: &str) -> PathBuf {
    convert_with(manifest, name, klp_convert::Options::default())
}

fn convert_with(manifest: &str, name: &str, options: klp_convert::Options) -> PathBuf {
    loadfix::convert_loadfix(manifest, &options, &dir(), name)
}

const MANIFEST: &str = r#"{
  "patch": { "objects": [ { "object": "vmlinux",
     "funcs": [ { "old": "klp_loadee_compute", "new": "klp_loadee_compute_fixed" } ],
     "callbacks": { "pre_patch": "klp_loadfix_pre_patch" } } ] }
}"#;

const WITH_LIBRARY: &str = r#"{
  "patch": { "objects": [
    { "object": "vmlinux",
      "funcs": [ { "old": "klp_loadee_compute", "new": "klp_loadee_compute_fixed" } ] },
    { "object": "libklploadlib",
      "funcs": [ { "old": "klp_loadlib_value", "new": "klp_loadlib_value_fixed" } ] } ] }
}"#;

fn wait(p: &Process) {
    assert!(
        p.wait_transition(Duration::from_secs(20)),
        "transition ends"
    );
}

#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: the stack checks a transition waits for see stale contexts"
)]
fn a_patch_file_replaces_a_function_and_goes_again() {
    let (p, _g) = process();
    let path = convert(MANIFEST, "loadfix");
    assert_eq!(compute(1), 2, "the bug");
    let logged = p.log().1;
    let before = counter();
    let loaded = p
        .load_file(&path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("load: {e}\nlog: {:?}", p.log().0));
    assert_eq!(loaded.name, "loadfix");
    assert!(
        loaded.warnings.is_empty(),
        "nobody inlined it: {:?}",
        loaded.warnings
    );
    // The pre-patch callback of the file ran (it sets the patch's counter to 1000).
    let idx = p.symbols();
    let seen = idx.candidates(Some("[patch loadfix]"), "klp_loadfix_seen");
    assert_eq!(seen.len(), 1, "the patch's own symbols are indexed");
    // SAFETY: an `int` of the patch's data, mapped while the patch file is loaded.
    let seen = unsafe { std::ptr::read_volatile(seen[0] as *const i32) };
    assert!(seen >= 1000, "pre_patch ran: {seen}");
    wait(p);
    // helper(1) + abs(-2), and the counter moved by the replacement's +100.
    assert_eq!(compute(1), 12, "the fix runs");
    assert_eq!(
        counter(),
        before + 100,
        "the fix updates the program's static"
    );
    assert!(p.list().iter().any(|x| x.name == "loadfix" && x.enabled));

    // A second patch file for the same function stacks on the first.
    let second = convert(
        &MANIFEST.replace(
            "\"callbacks\": { \"pre_patch\": \"klp_loadfix_pre_patch\" }",
            "\"callbacks\": {}",
        ),
        "loadfix2",
    );
    p.load_file(&second, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("second patch: {e}\nlog: {:?}", p.log().0));
    wait(p);
    assert_eq!(compute(1), 12);
    p.disable("loadfix2").expect("disable the second");
    wait(p);
    p.run_due_work();
    p.unload("loadfix2").expect("unload the second");
    assert_eq!(compute(1), 12, "the first is still there");
    // A site that cannot jump straight to its replacement (ppc64le: a patch file has a
    // TOC of its own) is reported once while registered, not at every transition's end
    // (three here: each patch's, and the second's going).
    let log = p.log_since(logged);
    let out_of_reach: Vec<_> = log
        .iter()
        .filter(|l| l.contains("stays on the trampoline"))
        .collect();
    assert!(
        out_of_reach.len() <= 1,
        "reported more than once: {out_of_reach:?}"
    );

    // Unloading an enabled patch is refused; disabling reverts.
    let e = p.unload("loadfix").expect_err("busy while enabled");
    assert!(e.message.contains("-EBUSY"), "{e}");
    p.disable("loadfix").expect("disable");
    wait(p);
    p.run_due_work();
    assert_eq!(compute(1), 2, "reverted");
    // The same file can be loaded again once disabled.
    p.load_file(&path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("load again: {e}\nlog: {:?}", p.log().0));
    wait(p);
    assert_eq!(compute(2), 22);
    p.disable("loadfix").expect("disable");
    wait(p);
    p.run_due_work();
    p.unload("loadfix").expect("unload");
    assert_eq!(compute(2), 3);
    let e = p.unload("loadfix").expect_err("gone");
    assert!(e.message.contains("-ENOENT"), "{e}");
}

fn refused(p: &'static Process, path: &Path, errno: &str) -> String {
    let e = p
        .load_file(path, &LoadOptions::default())
        .expect_err("refused");
    assert!(e.message.contains(errno), "{errno} expected: {e}");
    assert_eq!(compute(5), 6, "the program is unharmed");
    e.message
}

#[test]
fn bad_files_are_refused_and_leave_nothing() {
    let (p, _g) = process();
    let d = dir();
    // Missing, garbage, truncated, an ordinary object, a wrong old name.
    refused(p, &d.join("nonexistent.o"), "-ENOENT");
    let junk = d.join("junk.o");
    std::fs::write(&junk, b"\x7fELF but not really").unwrap();
    refused(p, &junk, "-ENOEXEC");
    let good = convert(MANIFEST, "trunc");
    let bytes = std::fs::read(&good).unwrap();
    let trunc = d.join("trunc2.o");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    refused(p, &trunc, "-ENOEXEC");
    let m = refused(p, Path::new(env!("KLP_LOADFIX_O")), "-ENOEXEC");
    assert!(m.contains("klp-convert"), "{m}");
    // A function without a patch site (Rust code here), a sympos that does not exist.
    let nosite = convert(
        &MANIFEST.replace(
            "\"old\": \"klp_loadee_compute\"",
            "\"old\": \"klp_loader_plain\"",
        ),
        "nosite",
    );
    let m = refused(p, &nosite, "-EINVAL");
    assert!(
        m.starts_with("no patch site at the entry of 'klp_loader_plain' (-EINVAL): build with -"),
        "{m}"
    );
    assert_eq!(klp_loader_plain(1), 1);
    assert!(p.list().is_empty(), "{:?}", p.list());
}

/// A function of this executable without a patch site.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn klp_loader_plain(x: i32) -> i32 {
    std::hint::black_box(x)
}

/// `klp_loadlib_value` and `klp_loadlib_count` of the library `l`.
fn lib_calls(l: &klp_user::Library) -> (i32, i32) {
    let _ = l;
    let open = |name: &str| {
        let c = std::ffi::CString::new(name).unwrap();
        let path = std::ffi::CString::new(env!("KLP_LOADLIB_SO")).unwrap();
        // SAFETY: the library is open (`l`); RTLD_NOLOAD only finds it.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        assert!(!h.is_null(), "library loaded");
        // SAFETY: `h` is a valid handle, `c` a NUL-terminated name.
        let f = unsafe { libc::dlsym(h, c.as_ptr()) };
        // SAFETY: balances the RTLD_NOLOAD reference taken above.
        unsafe { libc::dlclose(h) };
        assert!(!f.is_null(), "{name}");
        f
    };
    // SAFETY: both are `int f(int)` / `int f(void)` functions of tests/c/loadlib.c.
    unsafe {
        let value: extern "C" fn(i32) -> i32 = std::mem::transmute(open("klp_loadlib_value"));
        let count: extern "C" fn() -> i32 = std::mem::transmute(open("klp_loadlib_count"));
        (value(3), count())
    }
}

#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: the stack checks a transition waits for see stale contexts"
)]
fn a_patch_for_a_library_takes_effect_when_it_loads() {
    let (p, _g) = process();
    let path = convert(WITH_LIBRARY, "withlib");
    p.load_file(&path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("load: {e}\nlog: {:?}", p.log().0));
    wait(p);
    assert_eq!(compute(1), 12, "the program's part is in");
    let l = p
        .dlopen(env!("KLP_LOADLIB_SO"))
        .unwrap_or_else(|e| panic!("dlopen: {e}\nlog: {:?}", p.log().0));
    wait(p);
    // helper(3) = 21, and the library's static counter moved by 10.
    assert_eq!(
        lib_calls(&l),
        (21, 10),
        "the library's part is in on arrival"
    );
    l.close(p);
    // Opened again: the relocations were undone and are written again.
    let l = p.dlopen(env!("KLP_LOADLIB_SO")).expect("dlopen again");
    wait(p);
    assert_eq!(lib_calls(&l), (21, 10), "again after a close");
    p.disable("withlib").expect("disable");
    wait(p);
    p.run_due_work();
    assert_eq!(lib_calls(&l).0, 2, "reverted in the library");
    assert_eq!(compute(1), 2, "reverted in the program");
    l.close(p);
    p.unload("withlib").expect("unload");
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: the stack checks a transition waits for see stale contexts"
)]
fn only_the_right_patch_gets_in() {
    let (p, _g) = process();
    let d = dir().join("sig");
    std::fs::create_dir_all(&d).unwrap();
    let path = convert(MANIFEST, "rightpatch");
    let bytes = std::fs::read(&path).unwrap();

    // Unsigned under --require-signature: refused, the program unharmed.
    let trusted = d.join("trusted");
    std::fs::create_dir_all(&trusted).unwrap();
    chmod(&trusted, 0o755);
    let strict = LoadOptions {
        require_signature: true,
        trusted_keys: Some(trusted.clone()),
    };
    let e = p.load_file(&path, &strict).expect_err("unsigned refused");
    assert!(e.message.contains("not signed (-EKEYREJECTED)"), "{e}");
    assert_eq!(compute(5), 6);

    // Signed by a key in the trusted directory: in, with the signer named.
    let (key, _, public) = klp_convert::sign::keygen(&d.join("ops")).unwrap();
    std::fs::copy(&public, trusted.join("ops.pub")).unwrap();
    chmod(&trusted.join("ops.pub"), 0o644);
    let (signed, _) = klp_convert::sign::sign(&bytes, &key).unwrap();
    let signed_path = d.join("rightpatch.klp.o");
    std::fs::write(&signed_path, &signed).unwrap();
    let loaded = p
        .load_file(&signed_path, &strict)
        .unwrap_or_else(|e| panic!("signed load: {e}"));
    assert_eq!(loaded.signer.as_deref(), Some("ops"));
    wait(p);
    assert_eq!(compute(1), 12);
    p.disable("rightpatch").unwrap();
    wait(p);
    p.run_due_work();
    p.unload("rightpatch").unwrap();

    // One byte of the signed file changed: refused whatever the policy.
    let mut tampered = signed.clone();
    tampered[100] ^= 1;
    std::fs::write(&signed_path, &tampered).unwrap();
    let e = p
        .load_file(
            &signed_path,
            &LoadOptions {
                require_signature: false,
                trusted_keys: Some(trusted.clone()),
            },
        )
        .expect_err("tampered");
    assert!(
        e.message.contains("-EKEYREJECTED") || e.message.contains("-EBADMSG"),
        "{e}"
    );

    // Built for another build of the program: its recorded build id differs.
    let obj = object::read::elf::ElfFile64::<object::Endianness>::parse(&bytes[..]).unwrap();
    use object::{Object, ObjectSection};
    let note = obj
        .section_by_name(".note.klp.build-id")
        .expect("build id recorded");
    let (off, size) = note.file_range().unwrap();
    // The program's note: its descriptor is "vmlinux\0" and then the id.
    let sec = &bytes[off as usize..(off + size) as usize];
    let at = sec
        .windows(8)
        .position(|w| w == b"vmlinux\0")
        .expect("the program's build id")
        + 8;
    let mut other = bytes.clone();
    other[off as usize + at] ^= 0xff;
    let other_path = d.join("otherbuild.klp.o");
    std::fs::write(&other_path, &other).unwrap();
    let e = p
        .load_file(&other_path, &LoadOptions::default())
        .expect_err("another build");
    assert!(
        e.message.contains("-ENOEXEC") && e.message.contains("build"),
        "{e}"
    );
    assert_eq!(compute(5), 6);
    assert!(p.list().is_empty());
}

const INLINED: &str = r#"{
  "patch": { "objects": [ { "object": "vmlinux",
     "funcs": [ { "old": "klp_loadee_inl", "new": "klp_loadee_inl_fixed" } ] } ] }
}"#;

fn inl(x: i32) -> (i32, i32) {
    // SAFETY: C functions of tests/c/loadee.c; the pointer is initialised statically.
    unsafe { (klp_loadee_inl_caller(x), klp_loadee_inl_ptr(x)) }
}

#[test]
#[cfg_attr(
    klp_tsan,
    ignore = "ThreadSanitizer defers signals: the stack checks a transition waits for see stale contexts"
)]
fn an_inlined_target_is_reported_and_its_callers_can_be_patched_too() {
    let (p, _g) = process();
    assert_eq!(inl(2), (7, 6));
    // Replacing the function alone: its out-of-line copy changes, the caller that
    // inlined it does not, and the loader says so, naming the caller.
    let path = convert(INLINED, "inl");
    let loaded = p
        .load_file(&path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("load: {e}"));
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("'klp_loadee_inl' is inlined into 'klp_loadee_inl_caller'")),
        "{:?}",
        loaded.warnings
    );
    wait(p);
    assert_eq!(inl(2), (7, 8), "the caller keeps the inlined old code");
    p.disable("inl").unwrap();
    wait(p);
    p.run_due_work();
    p.unload("inl").unwrap();

    // With --patch-callers the caller is replaced by the patch's copy too.
    let path = convert_with(
        INLINED,
        "inlcallers",
        klp_convert::Options {
            patch_callers: true,
            ..Default::default()
        },
    );
    p.load_file(&path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("load: {e}"));
    wait(p);
    assert_eq!(inl(2), (9, 8), "the caller's copy has the fix");
    p.disable("inlcallers").unwrap();
    wait(p);
    p.run_due_work();
    p.unload("inlcallers").unwrap();
    assert_eq!(inl(2), (7, 6));
}
