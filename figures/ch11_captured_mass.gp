# Chapter 11: share of dense attention's softmax mass on the tokens the indexer selects, against k, for one decode
# query over 4096 tokens: random inputs (an untrained indexer), a needle far back, the same needle hidden from the
# indexer, the needle repeated 32 times, and a sliding window of k tokens on the needle input.
# Data: 11_deepseek_sparse_attention/captured_mass.dat, "k random needle blind repeated window".
load 'style.gp'

data = datadir.'/11_deepseek_sparse_attention/captured_mass.dat'
set title 'Softmax mass captured by the top-k selection (context 4096)'
set xlabel 'k (tokens selected)'
set ylabel 'captured mass'
set logscale x 2
set xtics ('1' 1, '4' 4, '16' 16, '64' 64, '256' 256, '1K' 1024, '4K' 4096)
set yrange [0 : 1.02]
set key top left font ',11'
plot data using 1 : 3 with linespoints linetype 1 title 'needle (indexer sees it)', \
     data using 1 : 5 with linespoints linetype 3 title 'needle repeated 32 times', \
     data using 1 : 4 with linespoints linetype 2 title 'needle, indexer blind', \
     data using 1 : 2 with linespoints linetype 4 title 'random inputs', \
     data using 1 : 6 with linespoints linetype 5 dashtype 2 title 'sliding window of k (needle)'
