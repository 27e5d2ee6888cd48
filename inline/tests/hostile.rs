//! Hostile and wrong input: typed errors, never a panic (these tests run with
//! overflow checks, in this crate and in gimli and object).

mod common;

use common::{Dir, build};
use klp_inline::{Analysis, Error, warning};

/// A deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Everything the crate offers, on whatever `data` is.
fn exercise(data: &[u8]) -> Result<(), Error> {
    let a = Analysis::new(data)?;
    for f in ["compute", "leaf", "mid", "gsmall", "gcalled", "worker", ""] {
        let i = a.inlined_into(f);
        let _ = warning(f, "the program", &i);
        let _ = i.stale_callers(f);
    }
    Ok(())
}

#[test]
fn garbage_is_not_elf() {
    assert_eq!(Analysis::new(&[]).err(), Some(Error::NotElf));
    assert_eq!(Analysis::new(b"hello").err(), Some(Error::NotElf));
    let mut rng = Rng(0x1234_5678);
    let noise: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
    assert_eq!(Analysis::new(&noise).err(), Some(Error::NotElf));
    // An ELF identification and nothing behind it.
    let mut head = b"\x7fELF\x02\x01\x01".to_vec();
    head.resize(20, 0);
    assert!(matches!(Analysis::new(&head), Err(Error::Elf(_))));
    let e = Analysis::new(&head).err().map(|e| e.to_string());
    assert!(e.is_some_and(|e| e.starts_with("malformed ELF file")));
}

#[test]
fn objects_and_compressed_debug_info_are_refused() {
    let dir = Dir::new("refused");
    let obj = build(
        "gcc",
        &["inlined.c"],
        &["-O2", "-g", "-c"],
        &dir,
        "inlined.o",
    );
    assert_eq!(Analysis::new(&obj).err(), Some(Error::NotLinked(1)));
    let gz = build(
        "gcc",
        &["inlined.c"],
        &["-O2", "-g", "-gz", "-shared", "-fPIC", "-nostdlib"],
        &dir,
        "gz.so",
    );
    assert_eq!(Analysis::new(&gz).err(), Some(Error::CompressedDebugInfo));
}

#[test]
fn truncated_files_never_panic() {
    let dir = Dir::new("truncated");
    let elf = build(
        "gcc",
        &["inlined.c"],
        &["-O2", "-g", "-DWITH_MAIN", "-Wl,--emit-relocs"],
        &dir,
        "prog",
    );
    assert!(exercise(&elf).is_ok());
    let mut errors = 0;
    for n in (0..elf.len()).step_by(97) {
        errors += usize::from(exercise(elf.get(..n).unwrap_or(&[])).is_err());
    }
    assert!(errors > 0);
}

#[test]
fn mutated_files_never_panic() {
    let dir = Dir::new("mutated");
    // KLP_INLINE_MUTATIONS: more rounds for a longer search.
    let rounds: usize = std::env::var("KLP_INLINE_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let mut outcomes = [0usize; 2];
    for (k, debug) in ["-g", "-gdwarf-4"].into_iter().enumerate() {
        let elf = build(
            "gcc",
            &["inlined.c", "clones.c"],
            &["-O3", debug, "-DWITH_MAIN", "-Wl,--emit-relocs"],
            &dir,
            "prog",
        );
        // The parts worth breaking: the sections read (DWARF, symbols, relocations),
        // and the headers.
        let file = object::File::parse(&*elf).expect("ELF");
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        {
            use object::{Object, ObjectSection};
            for s in file.sections() {
                let name = s.name().unwrap_or("");
                let read = [".debug", ".rela", ".symtab", ".strtab", ".dynsym"]
                    .iter()
                    .any(|p| name.starts_with(p));
                if let Some((off, size)) = s.file_range()
                    && size > 0
                    && read
                {
                    ranges.push((off as usize, size as usize));
                }
            }
        }
        ranges.push((0, 64));
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ k as u64);
        for _ in 0..rounds {
            let mut m = elf.clone();
            let (off, size) = ranges[rng.below(ranges.len())];
            for _ in 0..=rng.below(8) {
                let at = off + rng.below(size);
                if let Some(b) = m.get_mut(at) {
                    *b = match rng.below(4) {
                        0 => 0,
                        1 => 0xff,
                        2 => *b ^ (1 << rng.below(8)),
                        _ => rng.next() as u8,
                    };
                }
            }
            outcomes[usize::from(exercise(&m).is_ok())] += 1;
        }
    }
    println!(
        "mutations: {} refused, {} analysed",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}
