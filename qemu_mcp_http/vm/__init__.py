"""The VM core: its definition (spec, paths, store, index), where its paths may point (fence), its command line
(argv), its QMP and guest agent channels, what its operations share (shared, vmdir), and the lifecycle
operations put together with the capabilities in :mod:`.manager`."""
