//! A plugin whose constructor never returns when the host loads it: the host must bound the
//! load, report the file as timed out, serve its API and run every other plugin meanwhile.

use channeld_plugin_abi::{
    export_plugin,
    sdk::{AccountContext, ChannelPlugin, PluginError},
};

struct Stuck;

impl Stuck {
    fn new() -> Self {
        loop {
            std::thread::park();
        }
    }
}

impl ChannelPlugin for Stuck {
    const CHANNEL_ID: &'static str = "stuck";

    async fn start(&self, _ctx: AccountContext) -> Result<(), PluginError> {
        Ok(())
    }
}

export_plugin!(Stuck, Stuck::new);
