"""The DVC stages as functions: each reads params, builds its artefacts and returns its metrics. The stage
notebooks call these, draw the figures and write the metrics; each imports only its own stage's module."""
