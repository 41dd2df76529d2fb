"""Research runners (experiment tables, sweeps, rate studies): not installed; they use the product packages as they are."""
