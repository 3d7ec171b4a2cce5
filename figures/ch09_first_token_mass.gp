# Chapter 09: attention mass on token 0 per query position, measured in the chapter's program: random
# queries and keys, the constructed case (token 0's key aligned with a direction all queries share), and the
# constructed case with a learned sink logit; each curve the mean over the program's draws.
# Data: 09_sink_tokens/first_token_mass.dat, a header row of labels, then "query mass mass mass".
load 'style.gp'

data = datadir.'/09_sink_tokens/first_token_mass.dat'
set title 'Attention mass on token 0 (one head, full causal attention; mean of 32 draws)'
set xlabel 'query position t'
set ylabel 'weight on token 0'
set yrange [0 : 1]
set key top right font ',11'
plot for [i = 2:4] data using 1 : i with linespoints linetype (i - 1) title columnhead(i)
