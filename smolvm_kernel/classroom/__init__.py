"""Many students on one host: hostd (the root broker), the hub deployment, confinement."""
