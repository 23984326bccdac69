//! A plugin whose constructor panics when the host loads it: the host must report the load as
//! failed and keep running.

use channeld_plugin_abi::{
    export_plugin,
    sdk::{AccountContext, ChannelPlugin, PluginError},
};

struct Doomed;

impl Doomed {
    fn new() -> Self {
        panic!("the doomed plugin refuses to be constructed")
    }
}

impl ChannelPlugin for Doomed {
    const CHANNEL_ID: &'static str = "doomed";

    async fn start(&self, _ctx: AccountContext) -> Result<(), PluginError> {
        Ok(())
    }
}

export_plugin!(Doomed, Doomed::new);
