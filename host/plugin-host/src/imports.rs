//! What a component imports, checked against its kind and its manifest before anything runs: an import
//! that is no host capability is refused as extra, a capability the manifest did not request is refused
//! as undeclared (so plugin.toml is an honest list of what the plugin can do). Exports are checked first:
//! a component built against another version than its manifest names is told so, not about its imports.

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::capability::Capability;
use crate::error::LoadError;
use crate::manifest::PluginManifest;

/// Checks every import of `component`. `type_only` lists the kind's own interfaces that hold only types
/// (e.g. `computepool:sampler/types@0.1.0`), which a component may import without any capability.
pub(crate) fn check_imports(
    engine: &Engine,
    component: &Component,
    manifest: &PluginManifest,
    type_only: &[&str],
) -> Result<(), LoadError> {
    for (import, _) in component.component_type().imports(engine) {
        if type_only.contains(&import) {
            continue;
        }
        match Capability::from_import_name(import) {
            Some(capability) if capability.available_to(manifest.kind) => {
                if !manifest.capabilities.contains(&capability) {
                    return Err(LoadError::UndeclaredCapability {
                        id: manifest.id.clone(),
                        capability,
                        import: import.to_string(),
                    });
                }
            }
            _ => {
                let allowed = Capability::ALL
                    .into_iter()
                    .filter(|c| c.available_to(manifest.kind))
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(LoadError::ExtraImport {
                    id: manifest.id.clone(),
                    kind: manifest.kind,
                    import: import.to_string(),
                    allowed,
                });
            }
        }
    }
    Ok(())
}

/// Checks that `component` exports `interface` (e.g. `computepool:sampler/sample@0.1.0`), listing what it
/// exports instead when it does not.
pub(crate) fn check_export(
    engine: &Engine,
    component: &Component,
    manifest: &PluginManifest,
    interface: &str,
) -> Result<(), LoadError> {
    let ty = component.component_type();
    if ty.get_export(engine, interface).is_some() {
        return Ok(());
    }
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    Err(LoadError::WorldMismatch {
        id: manifest.id.clone(),
        world: format!("{}@{}", manifest.wit.world, manifest.wit.version),
        message: format!(
            "it does not export `{interface}` (it exports: {})",
            if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") }
        ),
    })
}
