//! test_klp_shadow_vars: the kernel's shadow-variable API test module, recreated. Its
//! whole test runs in init and prints every call with pointers replaced by small ids.

use std::rc::Rc;

use klp::Errno;
use klp::shadow::ShadowError;

use crate::kernel::Kernel;
use crate::modules::ModuleDef;
use crate::world::World;

const MOD: &str = "test_klp_shadow_vars";
const SV_ID1: u64 = 0x1234;
const SV_ID2: u64 = 0x1235;
const NUM_OBJS: usize = 3;
const SIZE: usize = 8;
/// Fake addresses of the module's stack objects and of its ctor/dtor functions.
const STACK: u64 = 0xffff_c900_0001_0000;
const CTOR: u64 = 0xffff_ffff_c0ff_0100;
const DTOR: u64 = 0xffff_ffff_c0ff_0200;

/// The module definition.
pub fn module() -> ModuleDef {
    ModuleDef {
        name: MOD,
        livepatch: false,
        params: vec![],
        define_funcs: |_, _| {},
        init,
        exit: |_| {},
    }
}

/// `ptr_id()`: small ids for pointers in first-seen order.
struct Ids(Vec<u64>);

impl Ids {
    fn id(&mut self, p: u64) -> usize {
        if let Some(i) = self.0.iter().position(|x| *x == p) {
            return i;
        }
        self.0.push(p);
        self.0.len() - 1
    }
}

/// `klp_shadow_alloc` / `klp_shadow_get_or_alloc` as the kernel exports them: NULL on
/// failure, with the kernel's messages.
fn shadow_create(
    w: &mut World,
    ids: &Rc<std::cell::RefCell<Ids>>,
    get_or: bool,
    obj: u64,
    id: u64,
    ctor_data: Option<u64>,
) -> u64 {
    let store = std::mem::take(&mut w.shadow);
    let mut lines = Vec::new();
    let ctor = |_: usize, data: &mut [u8]| -> Result<(), i32> {
        let Some(v) = ctor_data else {
            return Err(Errno::EINVAL.to_kernel());
        };
        if let Some(d) = data.get_mut(..8) {
            d.copy_from_slice(&v.to_ne_bytes());
        }
        let mut ids = ids.borrow_mut();
        let sd = data.as_ptr() as u64;
        lines.push(format!(
            "shadow_ctor: PTR{} -> PTR{}",
            ids.id(sd),
            ids.id(v)
        ));
        Ok(())
    };
    let r = if get_or {
        store.get_or_alloc_with(obj as usize, id, SIZE, ctor)
    } else {
        store.alloc_with(obj as usize, id, SIZE, ctor)
    };
    w.shadow = store;
    for l in lines {
        w.pr_mod(MOD, &l);
    }
    match r {
        Ok(a) => a.addr() as u64,
        Err(e @ ShadowError::Exists { .. }) => {
            w.warn(&e.to_string());
            0
        }
        Err(e @ ShadowError::Ctor { .. }) => {
            w.printk(&format!("livepatch: {e}"));
            0
        }
        Err(_) => 0,
    }
}

/// Reads the pointer stored in a variable's data.
fn deref(w: &World, obj: u64, id: u64) -> Option<u64> {
    let g = w.shadow.pin();
    let r = g.get(obj as usize, id)?;
    let b = r.bytes()?;
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some(u64::from_ne_bytes(a))
}

fn init(k: &mut Kernel) -> Result<(), Errno> {
    let w = &mut k.world;
    let ids = Rc::new(std::cell::RefCell::new(Ids(Vec::new())));
    ids.borrow_mut().id(0);
    let objs: Vec<u64> = (0..NUM_OBJS as u64).map(|i| STACK + 8 * i).collect();
    let nfields1: Vec<u64> = (0..NUM_OBJS as u64).map(|i| STACK + 0x100 + i).collect();
    let nfields2: Vec<u64> = (0..NUM_OBJS as u64)
        .map(|i| STACK + 0x200 + 4 * i)
        .collect();
    let say = |w: &mut World, s: String| w.pr_mod(MOD, &s);

    let get = |w: &mut World, obj: u64, id: u64| -> u64 {
        let sv = w
            .shadow
            .get(obj as usize, id)
            .map_or(0, |a| a.addr() as u64);
        let line = {
            let mut i = ids.borrow_mut();
            format!(
                "klp_shadow_get(obj=PTR{}, id=0x{id:x}) = PTR{}",
                i.id(obj),
                i.id(sv)
            )
        };
        w.pr_mod(MOD, &line);
        sv
    };
    let create = |w: &mut World, get_or: bool, obj: u64, id: u64, cd: u64| -> u64 {
        let sv = shadow_create(w, &ids, get_or, obj, id, Some(cd));
        let line = {
            let mut i = ids.borrow_mut();
            format!(
                "klp_shadow_{}(obj=PTR{}, id=0x{id:x}, size={SIZE:x}, gfp_flags=GFP_KERNEL), ctor=PTR{}, ctor_data=PTR{} = PTR{}",
                if get_or { "get_or_alloc" } else { "alloc" },
                i.id(obj),
                i.id(CTOR),
                i.id(cd),
                i.id(sv)
            )
        };
        w.pr_mod(MOD, &line);
        sv
    };
    let expect_null = |w: &mut World, sv: u64| -> bool {
        if sv == 0 {
            w.pr_mod(MOD, "  got expected NULL result");
            true
        } else {
            false
        }
    };
    let expect_ptr = |w: &mut World, sv: u64, obj: u64, id: u64, want: u64| -> bool {
        match deref(w, obj, id) {
            Some(v) if sv != 0 && v == want => {
                let line = {
                    let mut i = ids.borrow_mut();
                    format!("  got expected PTR{} -> PTR{} result", i.id(sv), i.id(v))
                };
                w.pr_mod(MOD, &line);
                true
            }
            _ => false,
        }
    };

    let mut ok = true;
    let sv = get(w, objs[0], SV_ID1);
    ok &= expect_null(w, sv);

    let mut sv1 = [0u64; NUM_OBJS];
    let mut sv2 = [0u64; NUM_OBJS];
    for i in 0..NUM_OBJS {
        ids.borrow_mut().id(nfields1[i]);
        sv1[i] = create(w, i % 2 == 0, objs[i], SV_ID1, nfields1[i]);
        ids.borrow_mut().id(nfields2[i]);
        sv2[i] = create(w, false, objs[i], SV_ID2, nfields2[i]);
        ok &= sv1[i] != 0 && sv2[i] != 0;
    }
    for i in 0..NUM_OBJS {
        let sv = get(w, objs[i], SV_ID1);
        ok &= sv == sv1[i] && expect_ptr(w, sv, objs[i], SV_ID1, nfields1[i]);
        let sv = get(w, objs[i], SV_ID2);
        ok &= sv == sv2[i] && expect_ptr(w, sv, objs[i], SV_ID2, nfields2[i]);
    }
    for i in 0..NUM_OBJS {
        let sv = create(w, true, objs[i], SV_ID1, nfields1[i]);
        ok &= sv == sv1[i] && expect_ptr(w, sv, objs[i], SV_ID1, nfields1[i]);
    }
    for obj in objs.iter().copied() {
        let store = std::mem::take(&mut w.shadow);
        let mut line = None;
        store.free_with(obj as usize, SV_ID1, |o, r| {
            let mut i = ids.borrow_mut();
            line = Some(format!(
                "shadow_dtor(obj=PTR{}, shadow_data=PTR{})",
                i.id(o as u64),
                i.id(r.addr().addr() as u64)
            ));
        });
        w.shadow = store;
        if let Some(l) = line {
            say(w, l);
        }
        let l = {
            let mut i = ids.borrow_mut();
            format!(
                "klp_shadow_free(obj=PTR{}, id=0x{SV_ID1:x}, dtor=PTR{})",
                i.id(obj),
                i.id(DTOR)
            )
        };
        say(w, l);
        let sv = get(w, obj, SV_ID1);
        ok &= expect_null(w, sv);
    }
    for i in 0..NUM_OBJS {
        let sv = get(w, objs[i], SV_ID2);
        ok &= sv == sv2[i] && expect_ptr(w, sv, objs[i], SV_ID2, nfields2[i]);
    }
    w.shadow.free_all(SV_ID2);
    say(
        w,
        format!("klp_shadow_free_all(id=0x{SV_ID2:x}, dtor=PTR0)"),
    );
    for obj in objs.iter().copied() {
        let sv = get(w, obj, SV_ID2);
        ok &= expect_null(w, sv);
    }
    if ok {
        Ok(())
    } else {
        w.shadow.free_all(SV_ID1);
        w.shadow.free_all(SV_ID2);
        Err(Errno::EINVAL)
    }
}
