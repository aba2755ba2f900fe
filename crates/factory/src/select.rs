//! Which factory serves VMs, decided from the `[factory]` settings as Kata's `NewFactory`
//! does, for the two kinds of callers:
//! - clients (`run`, later sandboxes) open a [`Factory`] with [`Factory::open`]: the
//!   VMCache server's when one is configured, else the template's, else direct boots;
//! - the VMCache server (`factory init` with `vm_cache_number > 0`) starts a
//!   [`CacheServerFactory`]: a warm cache of template clones or direct boots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::debug;

use crate::base::{DirectFactory, Factory, FactoryBase, FactoryError};
use crate::cache::CacheFactory;
use crate::config::VmConfig;
use crate::metrics::FactoryMetrics;
use crate::pool::PoolObserver;
use crate::settings::FactorySettings;
use crate::template::{self, TemplateError, TemplateFactory};
use crate::vmcache::GrpcCacheFactory;

/// Where a client's VMs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactoryChoice {
    /// A VMCache server on this Unix socket hands VMs out (`vm_cache_number > 0`).
    VmCache(PathBuf),
    /// Clones of the template at this path (`enable_template = true`).
    Template(PathBuf),
    /// Every VM boots (neither is configured).
    Direct,
}

impl FactoryChoice {
    /// The choice `[factory]` makes.
    pub fn from_settings(factory: &FactorySettings) -> Self {
        if factory.vm_cache_number > 0 {
            Self::VmCache(factory.vm_cache_endpoint.clone())
        } else if factory.enable_template {
            Self::Template(factory.template_path.clone())
        } else {
            Self::Direct
        }
    }

    /// Whether opening it needs the local VM config (kernel, initrd, sizes): a VMCache
    /// server says which config its VMs have, as Kata's `Config` RPC does.
    pub fn needs_local_config(&self) -> bool {
        !matches!(self, Self::VmCache(_))
    }
}

impl Factory {
    /// Opens the factory `choice` names. `local` is the VM config from the local settings
    /// (required unless a VMCache server serves). A template that cannot be used (missing,
    /// damaged, built from something else) falls back to direct boots, and
    /// [`Factory::notice`] says why; a VMCache server that does not answer is an error.
    pub async fn open(
        choice: &FactoryChoice,
        local: Option<&VmConfig>,
    ) -> Result<Self, FactoryError> {
        if let FactoryChoice::VmCache(endpoint) = choice {
            let client = GrpcCacheFactory::connect(endpoint)
                .await
                .map_err(Box::new)?;
            return Ok(Self::new(Arc::new(client)));
        }
        let config = local.ok_or(FactoryError::MissingConfig)?;
        let backend = config.backend();
        if let FactoryChoice::Template(path) = choice {
            match TemplateFactory::fetch(config, path, backend.clone()).await {
                Ok(template) => return Ok(Self::new(Arc::new(template))),
                Err(err) => {
                    let notice = format!("The template is not usable ({err}); booting directly");
                    // The caller shows the notice; a warning here would say it twice.
                    debug!(%err, "Template not usable; booting directly");
                    let direct = DirectFactory::new(config.clone(), backend);
                    return Ok(Self::degraded(Arc::new(direct), notice));
                }
            }
        }
        Ok(Self::new(Arc::new(DirectFactory::new(
            config.clone(),
            backend,
        ))))
    }
}

impl TemplateFactory {
    /// The template at `path` if it exists and matches `config`, else a new one (`true`
    /// when it was created here). A damaged or mismatched template is an error: it is not
    /// vmfactory's to replace silently.
    pub async fn open_or_create(
        config: &VmConfig,
        path: &Path,
    ) -> Result<(Self, bool), TemplateError> {
        let backend = config.backend();
        match Self::fetch(config, path, backend.clone()).await {
            Ok(template) => Ok((template, false)),
            Err(TemplateError::Missing(_)) => Ok((Self::new(config, path, backend).await?, true)),
            Err(err) => Err(err),
        }
    }
}

/// What a VMCache server serves: `vm_cache_number` warmed-up VMs, cloned from the
/// template when `enable_template = true` (created if missing, then removed again when the
/// server stops), else booted.
#[derive(Debug)]
pub struct CacheServerFactory {
    cache: Arc<CacheFactory>,
    created_template: Option<PathBuf>,
}

impl CacheServerFactory {
    /// Starts filling the cache; `metrics` (if any) is told what happens. Must be called
    /// within a tokio runtime.
    pub async fn start(
        factory: &FactorySettings,
        config: &VmConfig,
        metrics: Option<Arc<FactoryMetrics>>,
    ) -> Result<Self, FactoryError> {
        let (base, created_template): (Arc<dyn FactoryBase>, _) = if factory.enable_template {
            let path = &factory.template_path;
            let (template, created) = TemplateFactory::open_or_create(config, path)
                .await
                .map_err(Box::new)?;
            if let Some(metrics) = &metrics {
                let created = std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(template.metadata().created_unix);
                metrics.set_template_created(created);
            }
            let template = template.with_warm_pool(factory.template_warm_pool as usize);
            (Arc::new(template), created.then(|| path.clone()))
        } else {
            let direct = DirectFactory::new(config.clone(), config.backend());
            (Arc::new(direct), None)
        };
        // Cached VMs are warmed up: handing one out then takes milliseconds.
        let observer = metrics.map(|m| m as Arc<dyn PoolObserver>);
        let cache = Arc::new(CacheFactory::start(
            base,
            factory.vm_cache_number as usize,
            true,
            observer,
        ));
        Ok(Self {
            cache,
            created_template,
        })
    }

    /// The cache to serve.
    pub fn cache(&self) -> Arc<CacheFactory> {
        self.cache.clone()
    }

    /// Stops every cached VM and removes the template if this server created it.
    pub async fn close(&self) -> Result<(), FactoryError> {
        self.cache.close().await?;
        if let Some(path) = &self.created_template {
            template::destroy(path).map_err(Box::new)?;
        }
        Ok(())
    }
}
