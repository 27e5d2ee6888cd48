//! Which patch files get in (`klp_user::loader::verify`): build ids and signatures of
//! files made in the test by klp-convert (tests/c/loadfix.o converted against this
//! very executable and libklploadlib.so) and signed with klp-sign's code
//! (`klp_convert::sign`, what `klp-sign` and `klp-convert --sign` run).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use klp::Errno;
use klp_user::loader::verify::{
    self, EBADMSG, EKEYREJECTED, ENOKEY, ENOPKG, check, check_build_id, check_build_ids,
    default_keys_dir, patch_build_ids, running_build_id, split_signed,
};

fn dir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("klp-verify")
        .join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    chmod(&d, 0o755);
    d
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn gnu_build_id(path: &str) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    klp_convert::buildid::gnu_build_id(&data)
        .unwrap()
        .unwrap_or_else(|| panic!("{path} has no build id"))
}

/// tests/c/loadfix.o converted against `targets` ((name, file) pairs).
fn converted(targets: &[(&str, &str)]) -> Vec<u8> {
    let fix = std::fs::read(env!("KLP_LOADFIX_O")).unwrap();
    let data: Vec<Vec<u8>> = targets
        .iter()
        .map(|(_, f)| std::fs::read(f).unwrap())
        .collect();
    let inputs: Vec<klp_convert::TargetInput<'_>> = targets
        .iter()
        .zip(&data)
        .map(|((name, file), data)| klp_convert::TargetInput {
            name: name.to_string(),
            file: file.to_string(),
            data,
        })
        .collect();
    klp_convert::convert(
        "loadfix.o",
        &fix,
        &inputs,
        &klp_convert::Manifest::default(),
        &klp_convert::Options {
            keep_unresolved: true,
            ..Default::default()
        },
    )
    .unwrap()
    .data
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The path of the loaded C library (from /proc/self/maps).
fn libc_path() -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|b| b.starts_with("libc.so") || b.starts_with("libc-"))
        })
        .expect("libc in /proc/self/maps")
        .to_string()
}

#[test]
fn running_build_ids_are_read_from_memory() {
    // The executable (vmlinux) and the C library, against their files' notes.
    let exe = gnu_build_id("/proc/self/exe");
    assert_eq!(running_build_id("vmlinux"), Some(exe.clone()));
    let libc = libc_path();
    assert_eq!(
        running_build_id("libc"),
        Some(gnu_build_id(&libc)),
        "{libc}"
    );
    assert_ne!(running_build_id("libc"), Some(exe));
    assert_eq!(running_build_id("libklp-no-such-object"), None);
}

#[test]
fn the_patch_names_the_build_it_was_made_for() {
    let exe_id = gnu_build_id("/proc/self/exe");
    let lib_id = gnu_build_id(env!("KLP_LOADLIB_SO"));
    let patch = converted(&[
        ("vmlinux", "/proc/self/exe"),
        ("libklploadlib", env!("KLP_LOADLIB_SO")),
    ]);
    let ids = patch_build_ids(&patch).unwrap();
    assert_eq!(
        ids,
        vec![
            ("vmlinux".to_string(), exe_id.clone()),
            ("libklploadlib".to_string(), lib_id.clone())
        ]
    );
    // This executable is that build; libklploadlib is not loaded here: left for its
    // arrival.
    check_build_ids(&patch).unwrap();
    check_build_id("libklploadlib", &lib_id).unwrap();

    // Another build of the program: refused with -ENOEXEC, both ids named.
    let mut other = exe_id.clone();
    other[0] ^= 0xff;
    let e = check_build_id("vmlinux", &other).unwrap_err();
    assert_eq!(e.errno, Errno::ENOEXEC);
    assert_eq!(
        e.message,
        format!(
            "the patch was built for another build of the program (build id {}, the program \
             has {}) (-ENOEXEC): rebuild the patch against the binary that runs",
            hex(&other),
            hex(&exe_id)
        )
    );
    // The same through the file: a patch "for vmlinux" converted against another
    // binary (the C library's file, named vmlinux) is refused.
    let libc = libc_path();
    let wrong = converted(&[("vmlinux", &libc)]);
    assert_eq!(patch_build_ids(&wrong).unwrap()[0].1, gnu_build_id(&libc));
    let e = check_build_ids(&wrong).unwrap_err();
    assert_eq!(e.errno, Errno::ENOEXEC);
    assert!(e.message.contains("another build of the program"), "{e}");
    // A library's build: named by its name.
    let e = check_build_id("libc", &exe_id).unwrap_err();
    assert!(
        e.message.contains(&format!(
            "another build of libc (build id {}, libc has",
            hex(&exe_id)
        )),
        "{e}"
    );

    // --no-build-id: nothing recorded, nothing checked.
    let fix = std::fs::read(env!("KLP_LOADFIX_O")).unwrap();
    let exe = std::fs::read("/proc/self/exe").unwrap();
    let plain = klp_convert::convert(
        "loadfix.o",
        &fix,
        &[klp_convert::TargetInput {
            name: "vmlinux".into(),
            file: "/proc/self/exe".into(),
            data: &exe,
        }],
        &klp_convert::Manifest::default(),
        &klp_convert::Options {
            keep_unresolved: true,
            no_build_id: true,
            ..Default::default()
        },
    )
    .unwrap()
    .data;
    assert_eq!(patch_build_ids(&plain).unwrap(), vec![]);

    // A damaged note: the description's size beyond the section.
    let at = find(&patch, b"klp\0vmlinux\0") - 8;
    let mut bad = patch.clone();
    bad[at..at + 4].copy_from_slice(&0x7fff_0000u32.to_ne_bytes());
    let e = patch_build_ids(&bad).unwrap_err();
    assert_eq!(e.errno, Errno::ENOEXEC);
    assert!(
        e.message
            .contains("build id notes (.note.klp.build-id) are malformed"),
        "{e}"
    );
    // A changed id byte is a wrong build, not a damaged file.
    let mut changed = patch.clone();
    changed[at + 20] ^= 1;
    assert!(check_build_ids(&changed).is_err());
}

/// The error of a check that must refuse (a short message when it accepts).
fn refused(
    r: Result<(&[u8], Option<String>), klp_user::loader::LoadError>,
) -> klp_user::loader::LoadError {
    match r {
        Ok((elf, signer)) => panic!("accepted: {} bytes, signer {signer:?}", elf.len()),
        Err(e) => e,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle")
}

/// A key pair made by klp-sign's code in `d`, its public key in `d/trusted`.
fn keys(d: &Path, name: &str) -> (klp_convert::sign::SecretKey, PathBuf) {
    let (key, _, public) = klp_convert::sign::keygen(&d.join(name)).unwrap();
    let trusted = d.join(format!("trusted-{name}"));
    std::fs::create_dir_all(&trusted).unwrap();
    chmod(&trusted, 0o755);
    std::fs::copy(&public, trusted.join(format!("{name}.pub"))).unwrap();
    chmod(&trusted.join(format!("{name}.pub")), 0o644);
    (key, trusted)
}

#[test]
fn signatures_decide_which_files_get_in() {
    let d = dir("signatures");
    let patch = converted(&[("vmlinux", "/proc/self/exe")]);
    let (alice, trusted) = keys(&d, "alice");
    let (bob, only_bob) = keys(&d, "bob");
    let (signed, _) = klp_convert::sign::sign(&patch, &alice).unwrap();

    // Unsigned: accepted unless signatures are required.
    let (elf, signer) = check(&patch, false, &trusted).unwrap();
    assert_eq!((elf, signer), (&patch[..], None));
    let e = refused(check(&patch, true, &trusted));
    assert_eq!(e.errno, EKEYREJECTED);
    assert_eq!(
        e.message,
        format!(
            "the patch is not signed (-EKEYREJECTED): sign it with klp-sign and put the public \
             key in {}",
            trusted.display()
        )
    );

    // Signed by a trusted key: the ELF part and the key's name; its build ids hold.
    for require in [false, true] {
        let (elf, signer) = check(&signed, require, &trusted).unwrap();
        assert_eq!(elf, &patch[..]);
        assert_eq!(signer.as_deref(), Some("alice"));
        check_build_ids(elf).unwrap();
    }
    let (elf, block) = split_signed(&signed).unwrap();
    let block = block.unwrap();
    assert_eq!(elf, &patch[..]);
    assert_eq!(block.signer, "alice");
    assert_eq!(block.key_id, alice.public().key.to_vec());
    assert_eq!(block.fingerprint(), alice.public().fingerprint());

    // A tampered byte anywhere in the ELF part or the signature: refused, whatever
    // the policy.
    let n = patch.len();
    for at in [0, 64, n / 2, n - 1, n + 5 + 32, signed.len() - 28 - 12 - 1] {
        let mut t = signed.clone();
        t[at] ^= 0x10;
        for require in [false, true] {
            let e = refused(check(&t, require, &trusted));
            assert_eq!(e.errno, EKEYREJECTED, "byte {at}: {e}");
            assert!(
                e.message
                    .contains("does not match its contents (-EKEYREJECTED)"),
                "{e}"
            );
        }
    }

    // A key that is not trusted: refused even when signatures are not required.
    for require in [false, true] {
        let e = refused(check(&signed, require, &only_bob));
        assert_eq!(e.errno, ENOKEY);
        assert!(
            e.message.starts_with(&format!(
                "the patch is signed by key 'alice' (fingerprint {}), which is not among the 1 \
                 trusted keys of {}",
                alice.public().fingerprint(),
                only_bob.display()
            )),
            "{e}"
        );
        assert!(e.message.contains("(-ENOKEY)"), "{e}");
    }
    let (by_bob, _) = klp_convert::sign::sign(&patch, &bob).unwrap();
    assert_eq!(
        check(&by_bob, true, &only_bob).unwrap().1.as_deref(),
        Some("bob")
    );
    // A missing directory has no keys, and says so.
    let e = refused(check(&signed, false, &d.join("nowhere")));
    assert_eq!(e.errno, ENOKEY);
    assert!(e.message.contains("nowhere ("), "{e}");

    // Key files others can replace vouch for nothing.
    let pubfile = trusted.join("alice.pub");
    chmod(&pubfile, 0o664);
    let e = refused(check(&signed, false, &trusted));
    assert_eq!(e.errno, ENOKEY);
    assert!(
        e.message
            .contains("skipped: alice.pub (writable by its group or others, mode 664)"),
        "{e}"
    );
    chmod(&pubfile, 0o644);
    chmod(&trusted, 0o757);
    let e = refused(check(&signed, false, &trusted));
    assert!(
        e.message
            .contains("writable by its group or others, mode 757"),
        "{e}"
    );
    chmod(&trusted, 0o755);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Only root can give a file away: owned by another user, not counted.
        std::os::unix::fs::chown(&pubfile, Some(12345), None).unwrap();
        let e = refused(check(&signed, false, &trusted));
        assert!(
            e.message
                .contains("alice.pub (owned by uid 12345, not by uid 0 or root)"),
            "{e}"
        );
        std::os::unix::fs::chown(&pubfile, Some(0), None).unwrap();
    }
    assert!(check(&signed, true, &trusted).is_ok());

    // Malformed blocks: -EBADMSG; another scheme (a kernel module's PKCS#7): -ENOPKG.
    let info = signed.len() - 28 - 12;
    let mut t = signed.clone();
    t[info + 8] = 0x7f; // sig_len beyond the file
    assert_eq!(refused(check(&t, false, &trusted)).errno, EBADMSG);
    let mut t = signed.clone();
    t[info + 6] = 1; // padding
    assert_eq!(refused(check(&t, false, &trusted)).errno, EBADMSG);
    let mut t = signed.clone();
    t[info + 2] = 2; // PKEY_ID_PKCS7
    let e = refused(check(&t, false, &trusted));
    assert_eq!(e.errno, ENOPKG);
    assert!(e.message.contains("(-ENOPKG)"), "{e}");
    assert_eq!(verify::errno_name(EBADMSG), "-EBADMSG");

    // The default directory.
    let want = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".config"),
    };
    assert_eq!(default_keys_dir(), want.join("klp/keys"));
}
