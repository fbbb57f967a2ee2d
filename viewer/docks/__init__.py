"""One dock per file, all behind `ViewerDock`'s small interface (`refresh(index)`, `table()`, settings)."""
