//! [`SharedFake`]: a [`FakeDatapath`] behind an `Arc<Mutex>`, implementing [`Datapath`],
//! so that a test can run the agent loop on one task and look at the maps from another.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use weir_core::{
    datapath::{ApplyOutcome, Datapath, FakeDatapath},
    image::MapImage,
    plan::Plan,
};

#[derive(Clone, Default)]
pub struct SharedFake(pub Arc<Mutex<FakeDatapath>>);

impl SharedFake {
    pub fn new(fake: FakeDatapath) -> Self {
        Self(Arc::new(Mutex::new(fake)))
    }

    /// What the fake maps hold now.
    pub fn image(&self) -> MapImage {
        self.0.lock().unwrap().image.clone()
    }

    /// Number of ops applied so far.
    pub fn ops(&self) -> usize {
        self.0.lock().unwrap().log.len()
    }
}

impl Datapath for SharedFake {
    fn apply(&mut self, plan: &Plan) -> ApplyOutcome {
        self.0.lock().unwrap().apply(plan)
    }

    fn read_image(&self) -> Result<MapImage, String> {
        self.0.lock().unwrap().read_image()
    }

    fn capacities(&self) -> BTreeMap<&'static str, u32> {
        self.0.lock().unwrap().capacities()
    }
}
