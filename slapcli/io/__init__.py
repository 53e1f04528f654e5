"""Reading instruction data (containers, compression, row layouts) and writing outputs safely."""
