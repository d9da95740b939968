//! Snapshots of the node cache: format, codecs, chunking, stores and paranoid restore.
