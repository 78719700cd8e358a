"""tap-commerce-exports: Intelligems, Next Commerce and Voucherify bulk CSV exports as Singer streams."""
