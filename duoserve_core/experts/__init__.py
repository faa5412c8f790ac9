"""Expert storage and movement: host store, formats, device slots, copy stream, cache."""
