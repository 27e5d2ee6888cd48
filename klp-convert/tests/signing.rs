//! Build ids and signatures: `.note.klp.build-id` written for ELF targets with a
//! build id (read back byte by byte against the layout in `klp_convert::buildid`),
//! and `klp-sign` / `klp-convert --sign` (keys, the appended block against the layout
//! in `klp_convert::sign`, verification, tampering, untrusted and badly protected
//! keys). Objects are built in memory, so this runs on every host; the binaries run
//! through `KLP_TEST_RUNNER` under QEMU.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{ALL, Def, PatchExtras, build_patch, build_target, build_target_with_build_id, parse};
use klp_convert::{Error, Manifest, Options, TargetInput, convert};

fn bin(name: &str, dir: &Path, args: &[&str]) -> Output {
    let bin = match name {
        "klp-sign" => env!("CARGO_BIN_EXE_klp-sign"),
        _ => env!("CARGO_BIN_EXE_klp-convert"),
    };
    let runner = std::env::var("KLP_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut c = match words.next() {
        Some(emu) => {
            let mut c = Command::new(emu);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.args(args)
        .current_dir(dir)
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn workdir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("klp-signing")
        .join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

const ID: [u8; 20] = [
    0x1a, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f, 0x70, 0x81, 0x92, 0xa3, 0xb4, 0xc5, 0xd6, 0xe7, 0xf8, 0x09,
    0x10, 0x21, 0x32, 0x43,
];

/// A patch using a static function and variable of vmlinux and a function of mymod;
/// vmlinux with build id [`ID`], mymod without one.
fn inputs(a: &common::ArchSpec) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let (patch, _) = build_patch(
        a,
        &["static_fn", "static_var", "mod_fn"],
        &PatchExtras::default(),
    );
    let vmlinux = build_target_with_build_id(
        a,
        &[
            Def::local("static_fn", "a.c"),
            Def::local("static_var", "a.c").data(),
        ],
        Some(&ID),
    );
    let mymod = build_target(a, &[Def::global("mod_fn")]);
    (patch, vmlinux, mymod)
}

#[test]
fn build_ids_of_elf_targets_are_recorded_in_a_note_section() {
    for a in ALL {
        let (patch, vmlinux, mymod) = inputs(&a);
        let targets = [
            TargetInput {
                name: "vmlinux".into(),
                file: "vmlinux".into(),
                data: &vmlinux,
            },
            TargetInput {
                name: "mymod".into(),
                file: "mymod.o".into(),
                data: &mymod,
            },
        ];
        let out = convert(
            "patch.o",
            &patch,
            &targets,
            &Manifest::default(),
            &Options::default(),
        )
        .unwrap();
        let b = &out.report.build_ids;
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].object.as_str(), b[0].id.as_deref()),
            ("vmlinux", Some(&ID[..]))
        );
        assert!(b[0].recorded);
        assert_eq!(
            (b[1].object.as_str(), b[1].id.as_deref(), b[1].recorded),
            ("mymod", None, false)
        );

        let p = parse(&out.data);
        common::check_invariants(&p);
        let s = p.section(".note.klp.build-id");
        // SHT_NOTE, no flags (not loaded), 4-aligned.
        assert_eq!(
            (s.sh_type, s.sh_flags, s.sh_addralign),
            (7, 0, 4),
            "{:?}",
            a.arch
        );
        // One note: namesz 4, descsz 8 + 20 = 28, type 3, "klp\0",
        // "vmlinux\0" + the id (28 bytes, a multiple of 4: no padding).
        let word = |v: u32| {
            if p.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut want = Vec::new();
        want.extend_from_slice(&word(4));
        want.extend_from_slice(&word(28));
        want.extend_from_slice(&word(3));
        want.extend_from_slice(b"klp\0vmlinux\0");
        want.extend_from_slice(&ID);
        assert_eq!(s.data, want, "{:?}", a.arch);
        // The library's reader agrees, and the livepatch core reads the file.
        assert!(klp::elf::PatchObject::parse(&out.data).is_ok());

        // --no-build-id: no section.
        let out = convert(
            "patch.o",
            &patch,
            &targets,
            &Manifest::default(),
            &Options {
                no_build_id: true,
                ..Options::default()
            },
        )
        .unwrap();
        assert!(!parse(&out.data).has_section(".note.klp.build-id"));
        assert!(!out.report.build_ids[0].recorded);
        assert_eq!(out.report.build_ids[0].id.as_deref(), Some(&ID[..]));
    }
}

#[test]
fn a_second_build_id_section_is_refused_unless_none_is_written() {
    let a = ALL[0];
    let (patch, vmlinux, _) = inputs(&a);
    let (patch2, _) = build_patch(&a, &["static_fn"], &PatchExtras::default());
    let t = [TargetInput {
        name: "vmlinux".into(),
        file: "vmlinux".into(),
        data: &vmlinux,
    }];
    let once = convert(
        "patch.o",
        &patch2,
        &t,
        &Manifest::default(),
        &Options::default(),
    )
    .unwrap();
    // The converted file again: its symbols are converted already, and it carries the
    // notes.
    let e = convert(
        "again.o",
        &once.data,
        &t,
        &Manifest::default(),
        &Options::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::BuildIdExists { .. }), "{e}");
    assert!(e.to_string().contains("--no-build-id"), "{e}");
    let keep = Options {
        no_build_id: true,
        ..Options::default()
    };
    let again = convert("again.o", &once.data, &t, &Manifest::default(), &keep).unwrap();
    assert!(parse(&again.data).has_section(".note.klp.build-id"));
    // A symbol map has no build id: nothing recorded.
    let map = "0000000000001000 t static_fn\n0000000000002000 d static_var\n\
               0000000000003000 T mod_fn\n";
    let t = [TargetInput {
        name: "vmlinux".into(),
        file: "System.map".into(),
        data: map.as_bytes(),
    }];
    let out = convert(
        "patch.o",
        &patch,
        &t,
        &Manifest::default(),
        &Options::default(),
    )
    .unwrap();
    assert!(!parse(&out.data).has_section(".note.klp.build-id"));
    assert_eq!(out.report.build_ids[0].id, None);
}

#[test]
fn klp_sign_makes_keys_signs_and_verifies() {
    let dir = workdir("klp-sign");
    let keys = dir.join("keys");
    std::fs::create_dir(&keys).unwrap();
    chmod(&keys, 0o700);
    let o = bin("klp-sign", &dir, &["keygen", "keys/alice"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("key alice (fingerprint "),
        "{}",
        stdout(&o)
    );
    let secret = std::fs::read_to_string(keys.join("alice.key")).unwrap();
    let public = std::fs::read_to_string(keys.join("alice.pub")).unwrap();
    let mode = std::fs::metadata(keys.join("alice.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // One line each: kind, 64 hex digits, name.
    for (text, kind) in [
        (&secret, "klp-ed25519-secret"),
        (&public, "klp-ed25519-public"),
    ] {
        let f: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(f.len(), 3, "{text}");
        assert_eq!((f[0], f[2]), (kind, "alice"));
        assert!(f[1].len() == 64 && f[1].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(text.lines().count(), 1);
    }
    let pubkey = public.split_whitespace().nth(1).unwrap().to_string();
    // Never overwritten.
    let o = bin("klp-sign", &dir, &["keygen", "keys/alice"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("(-EEXIST)"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(keys.join("alice.key")).unwrap(),
        secret
    );
    let o = bin("klp-sign", &dir, &["keygen", "keys/bob"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Sign a converted patch.
    let elf = common::cases::converted(&common::cases::cases()[0]).data;
    std::fs::write(dir.join("lp.o"), &elf).unwrap();
    let o = bin(
        "klp-sign",
        &dir,
        &["sign", "--key", "keys/alice.key", "lp.o", "-o", "signed.o"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let signed = std::fs::read(dir.join("signed.o")).unwrap();
    // <ELF> "alice" <key 32> <sig 64> <info 12> magic.
    let n = elf.len();
    assert_eq!(&signed[..n], &elf[..]);
    assert_eq!(&signed[n..n + 5], b"alice");
    let key_hex: String = signed[n + 5..n + 37]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(key_hex, pubkey);
    assert_eq!(
        &signed[n + 101..n + 113],
        &[1, 0, 0x80, 5, 32, 0, 0, 0, 0, 0, 0, 64]
    );
    assert_eq!(&signed[n + 113..], b"~Module signature appended~\n");
    // The livepatch core reads the signed file's ELF part unchanged (the kernel
    // strips the signature before it parses the module).
    assert!(klp::elf::PatchObject::parse(&signed[..n]).is_ok());

    // Verified against a trusted directory.
    let trusted = dir.join("trusted");
    std::fs::create_dir(&trusted).unwrap();
    chmod(&trusted, 0o755);
    std::fs::copy(keys.join("alice.pub"), trusted.join("alice.pub")).unwrap();
    chmod(&trusted.join("alice.pub"), 0o644);
    let o = bin(
        "klp-sign",
        &dir,
        &["verify", "--keys", "trusted", "signed.o"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!(
            "good signature by trusted key alice (fingerprint {})",
            &pubkey[..16]
        )),
        "{}",
        stdout(&o)
    );

    let refused = |file: &str, keysdir: &str| {
        let o = bin("klp-sign", &dir, &["verify", "--keys", keysdir, file]);
        assert_eq!(o.status.code(), Some(1), "{file}: {}", stdout(&o));
        let e = stderr(&o);
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(e.starts_with("klp-sign: "), "{e}");
        e
    };
    // A tampered byte of the ELF part, of the signature, and of the key id.
    for (at, errno) in [
        (100, "-EKEYREJECTED"),
        (n + 60, "-EKEYREJECTED"),
        (n + 10, "-ENOKEY"),
    ] {
        let mut t = signed.clone();
        t[at] ^= 0x40;
        std::fs::write(dir.join("tampered.o"), &t).unwrap();
        let e = refused("tampered.o", "trusted");
        assert!(e.contains(&format!("({errno})")), "byte {at}: {e}");
    }
    // Unsigned.
    let e = refused("lp.o", "trusted");
    assert!(e.contains("not signed (-EKEYREJECTED)"), "{e}");
    // A key that is not trusted.
    let only_bob = dir.join("only-bob");
    std::fs::create_dir(&only_bob).unwrap();
    chmod(&only_bob, 0o755);
    std::fs::copy(keys.join("bob.pub"), only_bob.join("bob.pub")).unwrap();
    let e = refused("signed.o", "only-bob");
    assert!(e.contains("key 'alice'") && e.contains("(-ENOKEY)"), "{e}");
    // A key file others may write does not count, and the message says why.
    chmod(&trusted.join("alice.pub"), 0o666);
    let e = refused("signed.o", "trusted");
    assert!(
        e.contains("(-ENOKEY)") && e.contains("alice.pub (writable by its group or others"),
        "{e}"
    );
    chmod(&trusted.join("alice.pub"), 0o644);
    chmod(&trusted, 0o777);
    let e = refused("signed.o", "trusted");
    assert!(e.contains("writable by its group or others"), "{e}");
    chmod(&trusted, 0o755);

    // A secret key others may read is not used.
    chmod(&keys.join("bob.key"), 0o644);
    let o = bin("klp-sign", &dir, &["sign", "--key", "keys/bob.key", "lp.o"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("(-EACCES)"), "{}", stderr(&o));
    chmod(&keys.join("bob.key"), 0o600);

    // In place, then re-signed by another key: the old signature is replaced.
    std::fs::copy(dir.join("signed.o"), dir.join("twice.o")).unwrap();
    let o = bin(
        "klp-sign",
        &dir,
        &["sign", "--key", "keys/bob.key", "twice.o"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("replaced the signature by key alice"),
        "{}",
        stdout(&o)
    );
    let twice = std::fs::read(dir.join("twice.o")).unwrap();
    assert_eq!(&twice[..n], &elf[..]);
    assert_eq!(twice.len(), n + 3 + 32 + 64 + 12 + 28);
    let o = bin(
        "klp-sign",
        &dir,
        &["verify", "--keys", "only-bob", "twice.o"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn klp_convert_signs_its_output_and_reports_build_ids() {
    let dir = workdir("convert-sign");
    let a = ALL[0];
    let (patch, vmlinux, mymod) = inputs(&a);
    std::fs::write(dir.join("patch.o"), patch).unwrap();
    std::fs::write(dir.join("vmlinux"), vmlinux).unwrap();
    std::fs::write(dir.join("mymod.o"), mymod).unwrap();
    let o = bin("klp-sign", &dir, &["keygen", "k"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trusted = dir.join("trusted");
    std::fs::create_dir(&trusted).unwrap();
    chmod(&trusted, 0o755);
    std::fs::copy(dir.join("k.pub"), trusted.join("k.pub")).unwrap();
    chmod(&trusted.join("k.pub"), 0o644);

    let o = bin(
        "klp-convert",
        &dir,
        &[
            "-v",
            "--sign",
            "k.key",
            "-t",
            "vmlinux=vmlinux",
            "-t",
            "mymod=mymod.o",
            "patch.o",
            "-o",
            "out.o",
        ],
    );
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    let id: String = ID.iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        log.contains(&format!("vmlinux: build id {id} recorded")),
        "{log}"
    );
    assert!(
        log.contains("mymod: no build id recorded (mymod.o has no NT_GNU_BUILD_ID note)"),
        "{log}"
    );
    assert!(log.contains("signed with key k (fingerprint "), "{log}");
    let o = bin("klp-sign", &dir, &["verify", "--keys", "trusted", "out.o"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = std::fs::read(dir.join("out.o")).unwrap();
    assert!(out.ends_with(b"~Module signature appended~\n"));

    // --no-build-id, unsigned.
    let o = bin(
        "klp-convert",
        &dir,
        &[
            "-v",
            "--no-build-id",
            "-t",
            "vmlinux=vmlinux",
            "-t",
            "mymod=mymod.o",
            "patch.o",
            "-o",
            "plain.o",
        ],
    );
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("not recorded (--no-build-id)"), "{log}");
    let plain = std::fs::read(dir.join("plain.o")).unwrap();
    assert!(!parse(&plain).has_section(".note.klp.build-id"));
    assert!(!plain.ends_with(b"~Module signature appended~\n"));

    // A bad key: refused before anything is written.
    std::fs::write(dir.join("bad.key"), "not a key\n").unwrap();
    chmod(&dir.join("bad.key"), 0o600);
    let o = bin(
        "klp-convert",
        &dir,
        &[
            "--sign",
            "bad.key",
            "-t",
            "vmlinux=vmlinux",
            "-t",
            "mymod=mymod.o",
            "patch.o",
            "-o",
            "never.o",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot sign the output: bad.key is not a klp secret key"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.join("never.o").exists());
}

#[test]
fn klp_inspect_shows_build_ids_and_the_signature() {
    use klp_convert::inspect::{inspect, render_json, render_text};
    let a = ALL[1];
    let (patch, vmlinux, mymod) = inputs(&a);
    let targets = [
        TargetInput {
            name: "vmlinux".into(),
            file: "vmlinux".into(),
            data: &vmlinux,
        },
        TargetInput {
            name: "mymod".into(),
            file: "mymod.o".into(),
            data: &mymod,
        },
    ];
    let out = convert(
        "patch.o",
        &patch,
        &targets,
        &Manifest::default(),
        &Options::default(),
    )
    .unwrap();
    let key = klp_convert::sign::SecretKey::generate("k").unwrap();
    let (signed, _) = klp_convert::sign::sign(&out.data, &key).unwrap();
    let id: String = ID.iter().map(|b| format!("{b:02x}")).collect();

    // Against the build it was made for.
    let i = inspect("lp.o", &signed, &targets).unwrap();
    assert_eq!(i.build_ids.len(), 1);
    assert_eq!(i.build_ids[0].object, "vmlinux");
    assert_eq!(i.build_ids[0].id, id);
    assert_eq!(i.build_ids[0].matches, Some(true));
    let sig = i.signature.clone().unwrap();
    assert_eq!(sig.signer, "k");
    assert_eq!(sig.fingerprint, key.public().fingerprint());
    assert_eq!(sig.signed_bytes, out.data.len());
    assert!(i.warnings.is_empty(), "{:?}", i.warnings);
    let text = render_text(&i);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["build", "ids", "vmlinux:", id.as_str(), "(the", "target's)"]),
        "{text}"
    );
    assert!(text.contains("signature  key k (fingerprint "), "{text}");
    let json: serde_json::Value = serde_json::from_str(&render_json(&i)).unwrap();
    assert_eq!(json["build_ids"][0]["id"], id.as_str());
    assert_eq!(json["signature"]["signer"], "k");

    // Against another build: a warning.
    let other_id = [7u8; 20];
    let other = build_target_with_build_id(
        &a,
        &[
            Def::local("static_fn", "a.c"),
            Def::local("static_var", "a.c").data(),
        ],
        Some(&other_id),
    );
    let t2 = [TargetInput {
        name: "vmlinux".into(),
        file: "vmlinux".into(),
        data: &other,
    }];
    let i = inspect("lp.o", &out.data, &t2).unwrap();
    assert_eq!(i.build_ids[0].matches, Some(false));
    assert!(i.signature.is_none());
    assert!(
        i.warnings
            .iter()
            .any(|w| w.contains("another build of vmlinux") && w.contains(&"07".repeat(20))),
        "{:?}",
        i.warnings
    );
}
