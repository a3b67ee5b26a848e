"""The ways of making workers, behind the seam the pool sees (`seam`): the
template's forks (`template`), fresh interpreters (`spawn`), and a Dask
cluster's workers (`dask`, a front end's runner rather than a pool backend)."""
