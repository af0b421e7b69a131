//! `MultiCropLoader`: decoding and multi-crop augmentation of shuffled batches on native threads,
//! a bounded number of batches ahead of the consumer.
//!
//! One producer thread per epoch walks the epoch's order, decodes each chunk of images and
//! augments it on the dino_rs pool, and hands finished batches over a `sync_channel(prefetch)`.
//! Dropping the [`EpochIter`] stops the producer at the next image and joins it, so no thread
//! outlives the iteration.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::Dataset;
use crate::augment::multicrop::mix_seed;
use crate::augment::normalize::Pixel;
use crate::augment::MultiCropAugmenter;
use crate::error::{ensure, Error, Result};
use crate::parallel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    pub prefetch: usize,
    /// Skip unreadable images instead of failing the epoch.
    pub skip_errors: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            shuffle: true,
            drop_last: true,
            seed: 0,
            prefetch: 4,
            skip_errors: false,
        }
    }
}

/// One augmented batch: globals (2, B, 3, G, G) and locals (n_local, B, 3, L, L), row-major;
/// normalised f32, or u8 before normalisation (see [`Pixel`]).
#[derive(Debug, Clone)]
pub struct Batch<T = f32> {
    pub globals: Vec<T>,
    pub locals: Vec<T>,
    /// Dataset indices of the B images, in batch order.
    pub indices: Vec<usize>,
}

impl<T> Batch<T> {
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

#[derive(Clone)]
pub struct MultiCropLoader {
    dataset: Arc<dyn Dataset>,
    augmenter: Arc<MultiCropAugmenter>,
    config: LoaderConfig,
}

impl MultiCropLoader {
    pub fn new(dataset: Arc<dyn Dataset>, augmenter: Arc<MultiCropAugmenter>, config: LoaderConfig) -> Result<Self> {
        ensure(config.batch_size > 0, || "batch_size must be at least 1, got 0".into())?;
        ensure(config.prefetch > 0, || "prefetch must be at least 1, got 0".into())?;
        let n = dataset.len();
        ensure(n > 0, || "the dataset is empty".into())?;
        ensure(!config.drop_last || n >= config.batch_size, || {
            format!(
                "batch_size={} is larger than the dataset ({n} images) with drop_last=True: no batch would be produced",
                config.batch_size
            )
        })?;
        Ok(Self {
            dataset,
            augmenter,
            config,
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }
    pub fn augmenter(&self) -> &Arc<MultiCropAugmenter> {
        &self.augmenter
    }
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    /// Batches per epoch (fewer when `skip_errors` drops unreadable images).
    pub fn len(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The order in which epoch `epoch` visits the dataset (a permutation when shuffling).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(self.config.seed, epoch)));
        }
        order
    }

    /// Starts producing the batches of epoch `epoch`.
    pub fn iter_epoch(&self, epoch: u64) -> EpochIter {
        self.iter_epoch_as(epoch)
    }

    /// [`MultiCropLoader::iter_epoch`] with crops written as `T`: u8 before normalisation sends a
    /// quarter of the bytes to a GPU, which normalises them ([`crate::augment::normalize::Normalize::on_device`]).
    pub fn iter_epoch_as<T: Pixel>(&self, epoch: u64) -> EpochIter<T> {
        let (tx, rx) = sync_channel(self.config.prefetch);
        let stop = Arc::new(AtomicBool::new(false));
        let skipped = Arc::new(Skipped::default());
        let producer = Producer {
            loader: self.clone(),
            order: self.epoch_order(epoch),
            aug_seed: mix_seed(self.config.seed ^ 0xA5A5_5A5A_DEAD_BEEF, epoch),
            stop: stop.clone(),
            skipped: skipped.clone(),
            pixel: std::marker::PhantomData,
        };
        let handle = std::thread::Builder::new()
            .name("dino-rs-loader".into())
            .spawn(move || producer.run(|item| tx.send(item).is_ok()))
            .expect("spawning the loader thread");
        EpochIter {
            rx: Some(rx),
            stop,
            skipped,
            handle: Some(handle),
        }
    }
}

struct Producer<T> {
    loader: MultiCropLoader,
    order: Vec<usize>,
    aug_seed: u64,
    stop: Arc<AtomicBool>,
    skipped: Arc<Skipped>,
    pixel: std::marker::PhantomData<T>,
}

/// Unreadable images skipped in an epoch: how many, and the first one's error.
#[derive(Debug, Default)]
pub struct Skipped {
    count: AtomicUsize,
    first: Mutex<Option<String>>,
}

impl Skipped {
    fn record(&self, err: &Error) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.first.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
        }
    }
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
    pub fn first(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl<T: Pixel> Producer<T> {
    /// Sends batches through `send` until the epoch ends, an error, or `send` reports the consumer gone.
    fn run(self, send: impl Fn(Result<Batch<T>>) -> bool) {
        let cfg = self.loader.config;
        let mut pending: Vec<(usize, RgbImage)> = Vec::with_capacity(2 * cfg.batch_size);
        for chunk in self.order.chunks(cfg.batch_size) {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let decoded: Vec<(usize, Result<RgbImage>)> = parallel::install(|| {
                chunk
                    .par_iter()
                    .map(|&i| {
                        if self.stop.load(Ordering::Relaxed) {
                            return (i, Err(Error::Cancelled));
                        }
                        (i, self.loader.dataset.load(i))
                    })
                    .collect()
            });
            for (i, img) in decoded {
                match img {
                    Ok(img) => pending.push((i, img)),
                    Err(Error::Cancelled) => return,
                    Err(e) if cfg.skip_errors => self.skipped.record(&e),
                    Err(e) => {
                        send(Err(e));
                        return;
                    }
                }
            }
            while pending.len() >= cfg.batch_size {
                let rest = pending.split_off(cfg.batch_size);
                let full = std::mem::replace(&mut pending, rest);
                if !send(Ok(self.augment(full))) {
                    return;
                }
            }
        }
        if !cfg.drop_last && !pending.is_empty() && !self.stop.load(Ordering::Relaxed) {
            send(Ok(self.augment(pending)));
        }
    }

    fn augment(&self, items: Vec<(usize, RgbImage)>) -> Batch<T> {
        let indices: Vec<usize> = items.iter().map(|(i, _)| *i).collect();
        let images: Vec<&RgbImage> = items.iter().map(|(_, img)| img).collect();
        let keys: Vec<u64> = indices.iter().map(|&i| i as u64).collect();
        let (globals, locals) = parallel::install(|| self.loader.augmenter.batch_as(&images, self.aug_seed, &keys));
        Batch {
            globals,
            locals,
            indices,
        }
    }
}

/// What waiting for the next batch gave.
pub enum Next<T = f32> {
    Batch(Result<Batch<T>>),
    /// Nothing yet: the caller may check for interrupts and wait again.
    Pending,
    Done,
}

/// The batches of one epoch, produced in the background.
pub struct EpochIter<T = f32> {
    rx: Option<Receiver<Result<Batch<T>>>>,
    stop: Arc<AtomicBool>,
    skipped: Arc<Skipped>,
    handle: Option<JoinHandle<()>>,
}

impl<T> EpochIter<T> {
    /// Waits at most `timeout` for the next batch.
    pub fn next_timeout(&mut self, timeout: Duration) -> Next<T> {
        let Some(rx) = &self.rx else {
            return Next::Done;
        };
        match rx.recv_timeout(timeout) {
            Ok(item) => Next::Batch(item),
            Err(RecvTimeoutError::Timeout) => Next::Pending,
            Err(RecvTimeoutError::Disconnected) => {
                self.finish();
                Next::Done
            }
        }
    }

    /// Images skipped as unreadable so far in this epoch.
    pub fn skipped(&self) -> &Skipped {
        &self.skipped
    }

    /// Stops the producer and waits for it; idempotent.
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting on a full channel.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl<T> Iterator for EpochIter<T> {
    type Item = Result<Batch<T>>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_timeout(Duration::from_secs(3600)) {
                Next::Batch(b) => return Some(b),
                Next::Pending => continue,
                Next::Done => return None,
            }
        }
    }
}

impl<T> Drop for EpochIter<T> {
    fn drop(&mut self) {
        self.finish();
    }
}
