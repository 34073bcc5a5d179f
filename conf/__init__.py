"""sf's Hydra configs (this folder installs as the package data `sf.conf`; Hydra reads it as pkg://sf.conf)."""
