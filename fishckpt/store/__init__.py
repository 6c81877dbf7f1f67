"""The store: a dense base and a fixed mask written once, and one small verified file per saved step."""
