"""Message contracts: one module per topic, each the one definition of its records' fields,
types, bounds and (de)serialisation. `quotes` for `stock-quotes`, `windows` for
`stock-quotes-aggregated`, `dead_letters` for `stock-quotes-dlq`."""
