//! Runnable assemblies of kole (see the `examples` of this package).
