//! A disk that can lose power: a node's redb file kept in memory, where a
//! write is only durable once a sync has followed it.
//!
//! redb writes through [`redb::StorageBackend`]; this one applies each write
//! to what the node reads back at once (as a page cache does) and keeps it
//! in a list of unsynced changes until `sync_data`. A power loss keeps only
//! what was synced ([`Loss::Clean`]), or that and some of the unsynced
//! writes in order, the last of them cut short ([`Loss::Torn`]: the disk
//! was part-way through its queue). The handle the lost node still holds is
//! unplugged: what it writes afterwards it reads back, and nobody else.
//! A disk can also be full: every write fails until it is freed.
//!
//! The simulated nodes write inline (`node::Simulation`), so between two
//! of a node's steps every commit has been synced; a power loss that is to
//! find writes in flight is armed ([`Disk::arm`]) to happen at a given
//! write, part-way through a commit.

use std::io;
use std::sync::{Arc, Mutex};

use super::rng::Rng;

/// What a power loss leaves of the writes not yet synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// None of them.
    Clean,
    /// The first few, in order, and the first half of the next (at a
    /// 512-byte sector boundary).
    Torn,
}

/// A change not yet synced.
#[derive(Debug)]
enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Platters {
    /// What survives a power loss.
    durable: Vec<u8>,
    /// What the node reads: `durable` with `unsynced` applied.
    current: Vec<u8>,
    unsynced: Vec<Change>,
    /// Set by a power loss: this disk belongs to a node that is gone.
    unplugged: bool,
    /// A power loss to come.
    armed: Option<Armed>,
    /// No space left: every write and every growth fails.
    full: bool,
}

/// A power loss at the `at`-th write from now.
struct Armed {
    at: u64,
    loss: Loss,
    draw: u64,
    then: Box<dyn FnOnce(Disk) + Send>,
}

impl std::fmt::Debug for Armed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Armed({}, {:?})", self.at, self.loss)
    }
}

fn apply(bytes: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write(offset, data) => {
            let (start, end) = (*offset as usize, *offset as usize + data.len());
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
        }
        Change::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

/// One node's disk; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Disk(Arc<Mutex<Platters>>);

impl Disk {
    fn platters(&self) -> std::sync::MutexGuard<'_, Platters> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power: this disk is unplugged, and what it held through
    /// the loss is returned as a new disk, for the node's next start.
    pub fn lose_power(&self, loss: Loss, rng: &mut Rng) -> Disk {
        self.platters().lose_power(loss, rng.next())
    }

    /// Cuts the power at the `at`-th write from now (which is lost, or
    /// with `Loss::Torn` may land in part), then calls `then` with what the
    /// disk kept, as [`Disk::lose_power`] returns it.
    pub fn arm(
        &self,
        at: u64,
        loss: Loss,
        rng: &mut Rng,
        then: impl FnOnce(Disk) + Send + 'static,
    ) {
        self.platters().armed = Some(Armed {
            at: at.max(1),
            loss,
            draw: rng.next(),
            then: Box::new(then),
        });
    }

    /// Makes the disk full (every write fails with "no space left"), or
    /// frees it.
    pub fn set_full(&self, full: bool) {
        self.platters().full = full;
    }

    fn change(&self, change: Change) -> io::Result<()> {
        let mut p = self.platters();
        if p.full && !p.unplugged {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device",
            ));
        }
        // An unplugged disk's node reads its own writes (from its page
        // cache) until it stops; they are kept nowhere.
        apply(&mut p.current, &change);
        if p.unplugged {
            return Ok(());
        }
        p.unsynced.push(change);
        let Some(armed) = p.armed.as_mut() else {
            return Ok(());
        };
        armed.at -= 1;
        if armed.at > 0 {
            return Ok(());
        }
        let armed = p.armed.take().expect("armed");
        let kept = p.lose_power(armed.loss, armed.draw);
        drop(p);
        (armed.then)(kept);
        Ok(())
    }
}

impl Platters {
    fn lose_power(&mut self, loss: Loss, draw: u64) -> Disk {
        let p = self;
        p.unplugged = true;
        p.armed = None;
        let mut kept = p.durable.clone();
        if loss == Loss::Torn && !p.unsynced.is_empty() {
            let landed = (draw % p.unsynced.len() as u64) as usize;
            for change in &p.unsynced[..landed] {
                apply(&mut kept, change);
            }
            if let Change::Write(offset, data) = &p.unsynced[landed] {
                let half = (data.len() / 2) / 512 * 512;
                apply(&mut kept, &Change::Write(*offset, data[..half].to_vec()));
            }
        }
        Disk(Arc::new(Mutex::new(Platters {
            current: kept.clone(),
            durable: kept,
            ..Platters::default()
        })))
    }
}

impl redb::StorageBackend for Disk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.platters().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let p = self.platters();
        let start = offset as usize;
        let bytes = p
            .current
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change(Change::SetLen(len))
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut p = self.platters();
        if p.unplugged {
            return Ok(());
        }
        let unsynced = std::mem::take(&mut p.unsynced);
        for change in &unsynced {
            apply(&mut p.durable, change);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.change(Change::Write(offset, data.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;

    fn read(d: &Disk, offset: u64, n: usize) -> Vec<u8> {
        let mut out = vec![0; n];
        d.read(offset, &mut out).expect("in bounds");
        out
    }

    #[test]
    fn a_power_loss_keeps_only_what_was_synced() {
        let d = Disk::default();
        d.write(0, &[1; 1024]).unwrap();
        d.sync_data().unwrap();
        d.write(0, &[2; 1024]).unwrap();
        assert_eq!(read(&d, 0, 4), vec![2; 4], "the node reads its own write");
        let after = d.lose_power(Loss::Clean, &mut Rng::new(1));
        assert_eq!(read(&after, 0, 1024), vec![1; 1024]);
        d.write(0, &[3; 1024]).unwrap();
        assert_eq!(
            read(&after, 0, 4),
            vec![1; 4],
            "the old handle's writes go nowhere"
        );
    }

    #[test]
    fn an_armed_loss_comes_at_its_write() {
        let d = Disk::default();
        let kept = Arc::new(Mutex::new(None));
        let k = kept.clone();
        d.arm(2, Loss::Clean, &mut Rng::new(1), move |disk| {
            *k.lock().unwrap() = Some(disk)
        });
        d.write(0, &[1; 512]).unwrap();
        d.sync_data().unwrap();
        assert!(kept.lock().unwrap().is_none(), "not yet");
        d.write(0, &[2; 512]).unwrap();
        let after = kept.lock().unwrap().take().expect("the power went");
        assert_eq!(read(&after, 0, 512), vec![1; 512]);
        d.write(0, &[3; 512]).unwrap();
        assert_eq!(
            read(&after, 0, 4),
            vec![1; 4],
            "the unplugged disk keeps nothing more"
        );
    }

    #[test]
    fn a_full_disk_refuses_writes_until_freed() {
        let d = Disk::default();
        d.write(0, &[1; 512]).unwrap();
        d.set_full(true);
        let e = d.write(0, &[2; 512]).expect_err("full");
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert_eq!(
            read(&d, 0, 4),
            vec![1; 4],
            "a refused write changes nothing"
        );
        d.set_full(false);
        d.write(0, &[3; 512]).unwrap();
        assert_eq!(read(&d, 0, 4), vec![3; 4]);
    }

    #[test]
    fn a_torn_loss_keeps_part_of_the_queue() {
        let mut torn = 0;
        for seed in 0..20 {
            let d = Disk::default();
            d.write(0, &[1; 2048]).unwrap();
            d.sync_data().unwrap();
            d.write(0, &[2; 2048]).unwrap();
            d.write(2048, &[3; 2048]).unwrap();
            let after = d.lose_power(Loss::Torn, &mut Rng::new(seed));
            let bytes = read(&after, 0, 2048);
            assert!(bytes[1024..].iter().all(|&b| b == bytes[1024]));
            if bytes[0] == 2 && bytes[1024] == 1 {
                torn += 1;
            }
        }
        assert!(torn > 0, "no seed tore the first write in half");
    }
}
